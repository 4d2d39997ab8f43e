"""The official tinker SDK 0.38.0 against a live tinkerq: train, save, resume, sample.

Runs twice: on SQLite + the embedded Redis (what `honcho start` uses), and on PostgreSQL +
the Redis server. The model is the built-in tiny random-weight Qwen3 with the real Qwen
tokenizer, written by the worker on its first start.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.e2e.stack import API_KEY, Stack

pytestmark = pytest.mark.e2e
BASE = "tinkerq/tiny-qwen3"
# A small fixed SL dataset: prompt -> completion pairs over real Qwen token ids.
PAIRS = [([9707, 11, 1879], [1096, 374, 264, 1273, 13]),
         ([3838, 374, 220], [17, 10, 17, 28, 19]),
         ([785, 6941, 5562], [4855, 24201, 279, 16202, 13])]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request, tmp_path_factory):
    # runs idle for 5 s are released to disk: every test here also crosses that path
    s = Stack.start(tmp_path_factory.mktemp(f"stack-{request.param}"), request.param,
                    release_idle_s="5")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(stack):
    client = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
    yield client


def datum(prompt: list[int], completion: list[int]) -> types.Datum:
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "weights": np.array(weights, dtype=np.float32)},
    )


DATA = [datum(p, c) for p, c in PAIRS]
ADAM = types.AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def train_steps(tc, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(ADAM).result()
        losses.append(fb.result().metrics["loss:sum"])
    return losses


def forward_logprobs(tc, data=DATA) -> list[np.ndarray]:
    out = tc.forward(data, "cross_entropy").result()
    return [np.asarray(o["logprobs"].tolist(), dtype=np.float64) for o in out.loss_fn_outputs]


def worker_rss_mb(stack) -> float:
    status = Path(f"/proc/{stack.procs['worker'].pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))) / 1024


def test_idle_runs_are_released_and_the_worker_memory_comes_back(service, stack):
    """24 runs, each trained one step (weights, grads, AdamW moments: ~18 MB each on the tiny
    model's 151,936-token unembedding) raise the worker's RSS; once idle past release_idle_s
    they are written to disk and the RSS comes back down; a released run answers exactly as
    it did before and trains on."""
    def released() -> set[str]:
        log = (stack.data_dir / "worker.log").read_text(errors="replace")
        return {line.split("released model ", 1)[1].split(": its state", 1)[0]
                for line in log.splitlines() if "released model " in line}

    def wait_released(ids: set[str]) -> None:
        deadline = time.monotonic() + 90
        while not ids <= released() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ids <= released(), stack.logs()

    # First in the module: a warm-up run allocates the pass's own buffers, then leaves.
    warm = service.create_lora_training_client(BASE, rank=8, seed=99).result()
    train_steps(warm, 1)
    wait_released({warm.model_id})
    before = worker_rss_mb(stack)
    # 24 runs in flight together, so that all are held at once (the engine batches them)
    clients = [service.create_lora_training_client(BASE, rank=8, seed=100 + i).result()
               for i in range(24)]
    steps = [(tc.forward_backward(DATA, "cross_entropy"), tc.optim_step(ADAM)) for tc in clients]
    for fb, opt in steps:
        fb.result(), opt.result()
    peak = worker_rss_mb(stack)
    held = forward_logprobs(clients[0])
    assert peak - before > 24 * 10, (before, peak)  # the runs' state was really held
    wait_released({tc.model_id for tc in clients})
    after = worker_rss_mb(stack)
    assert after - before < 0.25 * (peak - before), (before, peak, after)
    np.testing.assert_array_equal(np.concatenate(held),
                                  np.concatenate(forward_logprobs(clients[0])))
    losses = train_steps(clients[0], 2)
    assert all(math.isfinite(x) for x in losses)


def test_supervised_training_halves_the_loss(service, stack):
    tc = service.create_lora_training_client(BASE, rank=16, seed=1).result()
    info = tc.get_info()
    assert info.model_data.model_name == BASE
    assert ":train:" in info.model_id
    assert tc.get_tokenizer().encode("Hello, world") == [9707, 11, 1879]  # the real Qwen BPE
    losses = train_steps(tc, 30)
    assert losses[0] > 0 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) <= 0.5 * losses[0], (losses, stack.logs())

    # Sampling after training reproduces the trained completion (greedy).
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt, completion = PAIRS[0]
    res = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=len(completion), temperature=0.0,
                                              stop=[])).result()
    seq = res.sequences[0]
    assert seq.tokens == completion
    assert seq.logprobs is not None and len(seq.logprobs) == len(completion)
    assert seq.stop_reason == "length"


def test_resume_with_optimizer_matches_an_uninterrupted_run(service):
    tc = service.create_lora_training_client(BASE, rank=8, seed=2).result()
    train_steps(tc, 3)
    path = tc.save_state("resume-point").result().path
    assert path.startswith("tinker://") and "/weights/resume-point" in path

    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    np.testing.assert_array_equal(
        np.concatenate(forward_logprobs(tc)), np.concatenate(forward_logprobs(resumed))
    )
    # The next optim_step is the same on both: Adam moments and step count came back.
    train_steps(tc, 1)
    train_steps(resumed, 1)
    np.testing.assert_allclose(
        np.concatenate(forward_logprobs(tc)), np.concatenate(forward_logprobs(resumed)),
        rtol=0, atol=1e-6,
    )


def test_sampler_from_path_matches_training_forward(service, stack):
    tc = service.create_lora_training_client(BASE, rank=8, seed=3).result()
    train_steps(tc, 2)
    saved = tc.save_weights_for_sampler("eval-point").result()
    assert "/sampler_weights/eval-point" in saved.path
    sampler = service.create_sampling_client(model_path=saved.path).result()
    prompt, completion = PAIRS[1]
    full = prompt + completion
    server = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert server[0] is None
    train_lp = forward_logprobs(tc, [datum(prompt, completion)])[0]  # log p(full[1:])
    np.testing.assert_allclose(np.array(server[1:], dtype=np.float64), train_lp, atol=2e-5)

    # topk_sample_logprobs on the saved adapter: greedy picks each position's top-1.
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    [seq] = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy,
                           topk_sample_logprobs=3).result().sequences
    ids, lps = seq.topk_logprobs_np.token_ids, seq.topk_logprobs_np.logprobs
    assert ids.shape == (4, 3) and ids[:, 0].tolist() == seq.tokens
    np.testing.assert_allclose(lps[:, 0], seq.logprobs, atol=1e-4)

    # The saved folder is a plain peft adapter that reproduces the server's numbers.
    peft_lp = _peft_logprobs(stack, saved.path, full)
    np.testing.assert_allclose(peft_lp, train_lp, atol=2e-4)


def _peft_logprobs(stack: Stack, tinker_path: str, tokens: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, name = tinker_path.removeprefix("tinker://").split("/")
    folders = list(Path(stack.data_dir, "checkpoints").glob(f"*/{run}/sampler_weights/{name}"))
    assert len(folders) == 1, folders
    assert json.loads((folders[0] / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(stack.data_dir / "models" / "tiny-qwen3")
    model = PeftModel.from_pretrained(base, folders[0]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])
    return logp[:, 0].numpy()


def test_rest_and_close(stack):
    service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)  # closed at the end
    tc = service.create_lora_training_client(
        BASE, rank=4, user_metadata={"renderer_name": "x"}
    ).result()
    tc.save_state("listed", ttl_seconds=3600, user_metadata={"step": "7"}).result()
    rest = service.create_rest_client()
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == BASE and run.user_metadata == {"renderer_name": "x"}
    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed["weights/listed"].expires_at is not None
    assert listed["weights/listed"].user_metadata == {"step": "7"}
    caps = rest.get_server_capabilities().result()
    assert BASE in [m.model_name for m in caps.supported_models]
    service.close("success").result()
    # The closed session's run leaves the worker's memory at once (not after release_idle_s)
    # and takes no more calls; its saved state loads into a new session.
    log = stack.data_dir / "worker.log"
    deadline = time.monotonic() + 30
    while (f"released model {tc.model_id}:" not in log.read_text(errors="replace")
           and time.monotonic() < deadline):
        time.sleep(0.1)
    text = log.read_text(errors="replace")
    assert f"session finished: releasing model(s) {tc.model_id}" in text, stack.logs()
    assert f"released model {tc.model_id}:" in text
    # (the SDK itself refuses calls through a closed client: ask over HTTP)
    adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    resp = httpx.post(f"{stack.url}/api/v1/optim_step", headers={"X-API-Key": API_KEY},
                      json={"model_id": tc.model_id, "seq_id": 3, "adam_params": adam})
    assert resp.status_code == 400 and "is finished" in resp.json()["detail"], resp.text
    again = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
    path = listed["weights/listed"].tinker_path
    resumed = again.create_training_client_from_state_with_optimizer(path).result()
    assert all(math.isfinite(x) for x in train_steps(resumed, 1))


def rl_datum(prompt: list[int], completion: list[int], advantage: float) -> types.Datum:
    tokens = prompt + completion
    n = len(tokens) - 1
    adv = [0.0] * (len(prompt) - 1) + [advantage] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "logprobs": np.full(n, -3.0, dtype=np.float32),
                        "advantages": np.array(adv, dtype=np.float32)},
    )


def test_every_loss_and_a_custom_loss_through_the_sdk(service):
    tc = service.create_lora_training_client(BASE, rank=4, seed=4).result()
    rl = [rl_datum(p, c, a) for (p, c), a in zip(PAIRS, (1.0, -0.5, 2.0), strict=True)]
    for loss_fn, config in [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9}),
                            ("cispo", {"clip_high_threshold": 1.1}), ("dro", {"beta": 0.1})]:
        out = tc.forward_backward(rl, loss_fn, config).result()
        assert math.isfinite(out.metrics["loss:sum"]), loss_fn
        assert [len(o["logprobs"].tolist()) for o in out.loss_fn_outputs] == [7, 7, 7]
    # gspo: the sequence ratio over the completion tokens, as the cookbook's rl_loop marks them
    masks = [np.array([0.0] * (len(p) - 1) + [1.0] * len(c), dtype=np.float32) for p, c in PAIRS]
    gspo = [types.Datum(model_input=d.model_input,
                        loss_fn_inputs=dict(d.loss_fn_inputs) | {"sequence_ratio_mask": m})
            for d, m in zip(rl, masks, strict=True)]
    out = tc.forward_backward(gspo, "gspo", {"clip_low_threshold": 0.5}).result()
    assert math.isfinite(out.metrics["loss:sum"]) and out.metrics["loss:sum"] != 0
    # Top-k distillation: [N, K] targets and weights (torch tensors travel as sparse CSR);
    # logprobs come back [N, K] beside a plain datum's [N]
    import torch

    tokens = PAIRS[0][0] + PAIRS[0][1]
    n = len(tokens) - 1
    top = torch.tensor([[t, 13, 11] for t in tokens[1:]])
    topk = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tinker.TensorData.from_torch(top),
        "weights": tinker.TensorData.from_torch(torch.tensor([[0.6, 0.3, 0.1]] * n))})
    out = tc.forward_backward([topk, DATA[1]], "cross_entropy").result()
    shapes = [tuple(o["logprobs"].shape) for o in out.loss_fn_outputs]
    assert shapes == [(n, 3), (len(PAIRS[1][0]) + len(PAIRS[1][1]) - 1,)], shapes
    assert math.isfinite(out.metrics["loss:sum"])
    # Negative and fractional weights are legal for cross_entropy (custom losses rely on it).
    custom = tc.forward_backward_custom(
        DATA, lambda data, logprobs: (sum(-lp.sum() for lp in logprobs), {"custom:sum": 1.0})
    ).result()
    assert {"loss:sum", "surrogate_loss:sum", "custom:sum"} <= set(custom.metrics)
    step = tc.optim_step(types.AdamParams(learning_rate=1e-3, grad_clip_norm=1.0)).result()
    assert step.metrics["grad_norm:mean"] > 0


def test_sampling_features(service):
    sampler = service.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints([9707, 11, 1879])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=123, stop=[])
    first = sampler.sample(prompt, 3, params).result()
    again = sampler.sample(prompt, 3, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # samples differ from each other
    ids = [s.sequence_id for s in first.sequences]
    assert len(set(ids)) == 3 and all(ids)

    stop_token = first.sequences[0].tokens[2]
    stopped = sampler.sample(prompt, 1, types.SamplingParams(
        max_tokens=6, seed=123, stop=[stop_token])).result().sequences[0]
    assert stopped.tokens == first.sequences[0].tokens[:3] and stopped.stop_reason == "stop"

    with_prompt = sampler.sample(prompt, 1, params, include_prompt_logprobs=True).result()
    assert with_prompt.prompt_logprobs[0] is None
    assert all(lp < 0 for lp in with_prompt.prompt_logprobs[1:])

    # The prompt scored on request: the last n tokens, chosen ids (sparse in, sparse out) and
    # draws from the model at every position; one prefill with the plain prompt logprobs.
    ids = np.full((len(prompt.to_ints()) - 1, 2), -1, dtype=np.int64)
    ids[1] = [42, 1879]
    target = types.TensorData.from_torch_sparse(torch.tensor(ids), pad_value=-1)
    scored = sampler.sample(prompt, 1, params, include_prompt_logprobs=True,
                            prompt_logprobs_last_n=1, target_prompt_logprobs=target,
                            prompt_alt_tokens_k=3).result()
    assert scored.prompt_logprobs[:2] == [None, None]
    assert scored.prompt_logprobs[2] == pytest.approx(with_prompt.prompt_logprobs[2], abs=1e-5)
    dense = scored.target_prompt_logprobs.to_torch().to_dense().numpy()
    assert dense.shape == (2, 2) and dense[0].tolist() == [0.0, 0.0]
    assert dense[1, 1] == pytest.approx(with_prompt.prompt_logprobs[2], abs=1e-5)  # id 1879
    alt = scored.prompt_alt_tokens
    assert alt.tokens.shape == alt.logprobs.shape == [2, 3]

    # Every sample above waited on the session's retrieve_futures poll; an unpickled clone
    # (as the cookbook's workers get) joins the session for a clone id of its own.
    clone = pickle.loads(pickle.dumps(sampler))
    cloned = clone.sample(prompt, 3, params).result().sequences
    assert [s.tokens for s in cloned] == [s.tokens for s in first.sequences]
    assert clone._cloned_sampler_id == 1


def test_a_group_of_calls_of_one_prompt_shares_its_prefill(service):
    """The cookbook's RL groups: 16 calls of one prompt, num_samples=1 each, sent at once.
    The worker prefills the prompt once while calls of it run; the others say so in
    prompt_cache_hit_tokens. Seeded, each call gets what it gets when sent alone."""
    sampler = service.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints([(97 * i) % 150000 + 200 for i in range(70)])
    params = [types.SamplingParams(max_tokens=96, temperature=1.0, seed=i, stop=[])
              for i in range(16)]
    futures = [sampler.sample(prompt, 1, p) for p in params]
    answers = [f.result() for f in futures]
    hits = [a.prompt_cache_hit_tokens for a in answers]
    assert set(hits) <= {0, 70} and hits.count(70) >= 8, hits
    alone = sampler.sample(prompt, 1, params[5]).result()
    assert alone.sequences[0].tokens == answers[5].sequences[0].tokens


def test_hostile_checkpoint_names_and_ttls_are_refused(service):
    """Regressions through the SDK: save_state(".") was accepted and replaced the run's whole
    weights/ folder (its other checkpoints' files with it), and a TTL of 10**12 seconds was
    accepted, written, then overflowed while being recorded, so its future never finished."""
    tc = service.create_lora_training_client(BASE, rank=8, seed=4).result()
    train_steps(tc, 1)
    kept = tc.save_state("keep-me").result().path
    for name, ttl in ((".", None), ("..", None), ("fine", 10**12), ("fine", 2**63)):
        with pytest.raises(tinker.BadRequestError, match="name|ttl_seconds"):
            tc.save_state(name, ttl_seconds=ttl).result(timeout=60)
    resumed = service.create_training_client_from_state(kept).result()
    np.testing.assert_array_equal(
        np.concatenate(forward_logprobs(tc)), np.concatenate(forward_logprobs(resumed))
    )


def test_hostile_requests_answer_json_4xx_and_a_canary_still_trains(service, stack):
    """Over the live stack, one request of each hostile class on the routes that take them
    (the API suite has the exhaustive cases): each is a 4xx with a JSON `detail`, nothing
    answers 500 (the web log holds no unhandled error), and a client trains and samples
    afterwards as if nothing had happened."""
    tc = service.create_lora_training_client(BASE, rank=8, seed=5).result()
    run = tc.model_id
    adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("post", "create_session", {"content": b'{"tags": ' + b"[" * 50_000 + b"]" * 50_000
                                    + b"}", "headers": json_type}),
        ("post", "create_session", {"json": {"tags": [], "user_metadata": {},
                                             "project_id": "p" * 10_000}}),
        ("post", "optim_step", {"json": {"model_id": run, "seq_id": 2**63,
                                         "adam_params": adam}}),
        ("post", "optim_step", {"json": {"model_id": run + "\x00", "seq_id": 1,
                                         "adam_params": adam}}),
        ("post", "optim_step", {"content": b'{"model_id": "%s", "seq_id": 1, "adam_params": '
                                b'{"learning_rate": NaN}}' % run.encode(),
                                "headers": json_type}),
        ("post", "save_weights", {"json": {"model_id": run, "seq_id": 1, "path": "."}}),
        ("post", "save_weights", {"json": {"model_id": run, "seq_id": 2, "path": "x",
                                           "ttl_seconds": 10**12}}),
        ("post", "create_model", {"json": {"session_id": "s", "model_seq_id": 2**70}}),
        ("get", f"training_runs/{run}%00", {}),
        ("get", "checkpoints?offset=" + "9" * 30, {}),
        ("delete", f"training_runs/{run}/checkpoints/weights/.", {}),
    ]
    with httpx.Client(base_url=f"{stack.url}/api/v1", timeout=30,
                      headers={"X-API-Key": API_KEY}) as http:
        for method, path, kwargs in cases:
            resp = http.request(method.upper(), path, **kwargs)
            assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[:200])
            assert resp.json()["detail"], (path, resp.text[:200])
    # the canary is another run: the requests above claimed seq_ids of `run`
    canary = service.create_lora_training_client(BASE, rank=8, seed=6).result()
    losses = train_steps(canary, 3)
    assert losses[-1] < losses[0]
    sampler = canary.save_weights_and_get_sampling_client("canary").result()
    sample = sampler.sample(types.ModelInput.from_ints([9707, 11]), 1,
                            types.SamplingParams(max_tokens=4)).result()
    assert 1 <= len(sample.sequences[0].tokens) <= 4
    assert "unhandled error" not in (stack.data_dir / "web.log").read_text(errors="replace")

