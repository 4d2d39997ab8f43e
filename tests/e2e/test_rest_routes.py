"""The SDK's routes beyond training and sampling, through the real SDK, its CLI and
tinker_cookbook on one live stack. A checkpoint's life: `tinker checkpoint download` and
`weights.download` (save_weights_external, signed URLs, age encryption, the temporary
export's TTL and deletion), the cookbook's merge, publishing to another key, TTL expiry swept
by the worker, copy_weights. Identity: JWTs (every SDK call here sends one), `tinker auth
whoami` and `status`, and the login/logout key endpoints."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from safetensors.torch import load_file
from tinker import types

from tests.e2e.stack import API_KEY, BIN, Stack
from tests.e2e.test_sdk import BASE, PAIRS, datum, train_steps

pytestmark = pytest.mark.e2e
OTHER_KEY = "tml-e2e-someone-else"
FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-ckpt"), "sqlite", checkpoint_sweep_s="1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(stack):
    return tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)


@pytest.fixture(scope="module")
def rest(stack):
    return tinker.RestClient(base_url=stack.url, api_key=API_KEY)


@pytest.fixture(scope="module")
def trained(service):
    """A run trained two steps, its state saved, and its sampler weights at the same step."""
    tc = service.create_lora_training_client(BASE, rank=4, seed=11).result()
    train_steps(tc, 2)
    state = tc.save_state("final").result().path
    sampler = tc.save_weights_for_sampler("final").result().path
    return tc, state, sampler


def server_folder(stack: Stack, tinker_path: str) -> Path:
    run, segment, name = tinker_path.removeprefix("tinker://").split("/")
    [folder] = Path(stack.data_dir, "checkpoints").glob(f"*/{run}/{segment}/{name}")
    return folder


def assert_same_adapter(folder: Path, sampler_folder: Path) -> None:
    """An export holds the sampler weights' adapter, its unembedding under Tinker's export
    name (model.unembed_tokens) rather than peft's lm_head."""
    assert sorted(p.name for p in folder.iterdir()) == FILES
    ours, theirs = (load_file(f / FILES[1]) for f in (folder, sampler_folder))
    if not any(".lm_head." in k for k in ours):  # an export (a copy keeps the names)
        theirs = {k.replace(".lm_head.", ".model.unembed_tokens."): v for k, v in theirs.items()}
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def exports(rest) -> list[str]:
    listed = rest.list_user_checkpoints(limit=1000).result()
    return [c.tinker_path for c in listed.checkpoints if c.checkpoint_type == "external"]


def test_the_cli_downloads_a_training_checkpoint(stack, service, rest, trained, tmp_path):
    _, state, sampler = trained
    env = {**os.environ, "TINKER_BASE_URL": stack.url, "TINKER_API_KEY": API_KEY,
           "TINKER_TELEMETRY": "0"}
    done = subprocess.run([str(BIN / "tinker"), "checkpoint", "download", state,
                           "--output", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
    folder = tmp_path / state.removeprefix("tinker://").replace("/", "_")
    assert_same_adapter(folder, server_folder(stack, sampler))
    assert exports(rest) == []  # the CLI's temporary export was deleted


def test_cookbook_download_decrypts_an_age_encrypted_export(stack, service, rest, trained, tmp_path,
                                                            monkeypatch):
    from tinker_cookbook import weights

    _, state, sampler = trained
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    out = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"),
                           base_url=stack.url)
    assert_same_adapter(Path(out), server_folder(stack, sampler))
    assert exports(rest) == []
    # The cookbook's merge takes it: with tied embeddings (the tiny model's), the unembedding
    # adapter lands on the shared embedding matrix.
    base = stack.data_dir / "models" / "tiny-qwen3"
    weights.build_hf_model(base_model=str(base), adapter_path=out,
                           output_path=str(tmp_path / "merged"), merge_strategy="full",
                           dtype="float32")
    embed = "model.embed_tokens.weight"
    merged, original = (load_file(next(f.glob("*.safetensors")))[embed]
                        for f in (tmp_path / "merged", base))
    assert not merged.equal(original)


def test_a_merged_export_gives_the_server_s_logprobs(stack, service, tmp_path, monkeypatch):
    """Without an unembedding adapter, the cookbook's merged model is exactly the adapted
    model the server samples from."""
    from tinker_cookbook import weights

    tc = service.create_lora_training_client(BASE, rank=4, seed=12, train_unembed=False).result()
    train_steps(tc, 2)
    state = tc.save_state("merge-me").result().path
    sampler = tc.save_weights_for_sampler("merge-me").result().path
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    out = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"),
                           base_url=stack.url)
    weights.build_hf_model(base_model=str(stack.data_dir / "models" / "tiny-qwen3"),
                           adapter_path=out, output_path=str(tmp_path / "merged"),
                           merge_strategy="full", dtype="float32")
    tokens = [9707, 11, 1879, 1096, 374, 264]
    server = service.create_sampling_client(model_path=sampler).result().compute_logprobs(
        types.ModelInput.from_ints(tokens)).result()
    np.testing.assert_allclose(merged_logprobs(tmp_path / "merged", tokens),
                               np.array(server[1:], dtype=np.float64), atol=2e-4)


def merged_logprobs(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])
    return logp[:, 0].numpy()


def test_an_export_s_urls_serve_its_encrypted_files(stack, service, rest, trained):
    import pyrage

    tc, _, sampler = trained
    identity = pyrage.x25519.Identity.generate()
    saved = tc.save_weights_external("kept", age_encryption_recipients=[
        str(identity.to_public())]).result()
    assert saved.path == f"tinker://{tc.model_id}/external_weights/kept"
    urls = rest.get_external_weights_urls(saved.path).result()
    assert sorted(urls.urls) == [f"{f}.age" for f in FILES]
    blob = httpx.get(  # no API key: the signed URL is the permission
        urls.urls[f"{FILES[0]}.age"]).raise_for_status().content
    plain = (server_folder(stack, sampler) / FILES[0]).read_bytes()
    assert pyrage.decrypt(blob, [identity]) == plain


def test_a_published_checkpoint_samples_for_another_key(stack, service, rest, trained):
    _, _, sampler = trained
    other = tinker.ServiceClient(base_url=stack.url, api_key=OTHER_KEY)
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=sampler).result()
    rest.publish_checkpoint_from_tinker_path(sampler).result()
    prompt = types.ModelInput.from_ints([9707, 11, 1879])
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    theirs = other.create_sampling_client(model_path=sampler).result()
    ours = service.create_sampling_client(model_path=sampler).result()
    tokens = [c.sample(prompt, 1, greedy).result().sequences[0].tokens for c in (theirs, ours)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6
    rest.unpublish_checkpoint_from_tinker_path(sampler).result()
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=sampler).result()


def test_an_expired_checkpoint_is_deleted_by_the_worker(stack, service, rest, trained):
    tc, _, _ = trained
    path = tc.save_state("short-lived").result().path
    folder = server_folder(stack, path)
    rest.set_checkpoint_ttl_from_tinker_path(path, 1).result()
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:  # the sweep runs every second
        time.sleep(0.2)
    assert not folder.exists(), stack.logs()
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert path not in [c.tinker_path for c in listed]
    assert f"checkpoint {path} expired: deleted" in (stack.data_dir / "worker.log").read_text()


def test_copy_weights_makes_a_sampleable_copy(stack, service, rest, trained):
    _, _, sampler = trained
    copy = rest.copy_weights(sampler, "archive", ttl_seconds=7200).result()
    assert copy != sampler and copy.endswith("/sampler_weights/final")
    assert_same_adapter(server_folder(stack, copy), server_folder(stack, sampler))
    prompt = types.ModelInput.from_ints([3838, 374, 220])
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    tokens = [service.create_sampling_client(model_path=p).result().sample(prompt, 1, greedy)
              .result().sequences[0].tokens for p in (sampler, copy)]
    assert tokens[0] == tokens[1]


def cli(stack: Stack, *args: str, key: str = API_KEY, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_BASE_URL": stack.url, "TINKER_API_KEY": key,
           "TINKER_TELEMETRY": "0"}
    return subprocess.run([str(BIN / "tinker"), *args], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def test_whoami_and_auth_status_read_the_jwt(stack, rest):
    me = rest.whoami().result()
    assert me.user_urn.startswith("tml:user:") and me.org_urn == "tml:organization:tinkerq"
    shown = cli(stack, "auth", "whoami")
    assert shown.returncode == 0 and me.user_urn in shown.stdout, shown.stdout + shown.stderr
    status = cli(stack, "auth", "status")
    assert status.returncode == 0 and "Tinker accessible: yes" in status.stdout, status.stderr


def test_login_checks_a_key_and_logout_s_delete_revokes_it(stack, tmp_path):
    from tinker.cli.auth_api import AuthApiError, TinkerAuthApi

    key = "tml-e2e-short-lived-key"
    with httpx.Client() as http:
        auth = TinkerAuthApi(http, base_url=stack.url)
        described = auth.get_self_api_key(key)
        assert described.name.startswith("key-")
        client = tinker.ServiceClient(base_url=stack.url, api_key=key)  # works until revoked
        client.create_sampling_client(base_model=BASE).result()
        auth.delete_self_api_key(key)
        with pytest.raises(AuthApiError, match="revoked"):
            auth.get_self_api_key(key)
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=stack.url, api_key=key).create_sampling_client(
            base_model=BASE).result()


def test_sessions_search_project_and_trace(stack, service, rest, trained):
    import warnings

    tc, _, _ = trained
    session_id = tc.model_id.split(":")[0]
    rest.assign_session_project(session_id, "proj-e2e").result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # search_sessions is marked experimental
        page = rest.search_sessions(types.SessionSearchRequest(project_ids=["proj-e2e"])).result()
    [found] = page.sessions
    assert found.session_id == session_id and found.checkpoints_count >= 2
    url = rest.export_session_trace(session_id).result()
    events = httpx.get(url).raise_for_status().json()["traceEvents"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert {"create_model", "forward_backward", "optim_step", "save_weights"} <= names


def test_inflight_samplers_adopt_the_newest_weights(service):
    """Two inflight clients of one run, the second made after more training: both sample
    from the newest weights; a snapshot client made beside the first keeps the old ones."""
    tc = service.create_lora_training_client(BASE, rank=4, seed=21).result()
    train_steps(tc, 1)
    first = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    train_steps(tc, 3)
    second = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    prompt = types.ModelInput.from_ints([9707, 11, 1879, 1096])
    lps = [np.array(c.compute_logprobs(prompt).result()[1:]) for c in (first, second, snapshot)]
    np.testing.assert_allclose(lps[0], lps[1], atol=1e-6)
    assert np.abs(lps[0] - lps[2]).max() > 1e-3


def test_the_openai_client_completes_and_chats(stack, service, trained):
    import openai
    from tokenizers import Tokenizer

    _, _, sampler = trained
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=API_KEY, max_retries=0)
    assert BASE in [m.id for m in client.models.list()]
    done = client.completions.create(model=BASE, prompt="Hello there", max_tokens=5,
                                     temperature=0, logprobs=2)
    [choice] = done.choices
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 5
    assert len(choice.logprobs.top_logprobs) == 5 and len(choice.logprobs.top_logprobs[0]) == 2
    # the same greedy sample as the SDK's on the prompt's tokens
    tokenizer = Tokenizer.from_file(str(stack.data_dir / "models" / "tiny-qwen3" /
                                        "tokenizer.json"))
    ids = tokenizer.encode("Hello there", add_special_tokens=False).ids
    [seq] = service.create_sampling_client(base_model=BASE).result().sample(
        types.ModelInput.from_ints(ids), 1,
        types.SamplingParams(max_tokens=5, temperature=0.0)).result().sequences
    np.testing.assert_allclose(choice.logprobs.token_logprobs, seq.logprobs, atol=1e-5)
    assert choice.text == tokenizer.decode(seq.tokens, skip_special_tokens=True)

    # a chat on the trained adapter, streamed and not
    ask = {"model": sampler, "messages": [{"role": "user", "content": "Hi"}],
           "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=1)
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(**ask, stream=True))
    assert streamed == whole.choices[0].message.content
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens == 6

    with pytest.raises(openai.BadRequestError, match="not served"):
        client.completions.create(model="someone/else", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-wrong", max_retries=0) \
            .models.list()


def test_admin_client_reads_usage_and_audit(stack, service, trained):
    """The worker records the tokens it trained and sampled; the admin routes sum them."""
    import datetime as dt

    tc, state, _ = trained
    admin = tinker.AdminClient(base_url=stack.url, api_key=API_KEY)
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    usage = admin.get_billing_usage(hour - dt.timedelta(hours=1),
                                    hour + dt.timedelta(hours=1)).result()
    mine = [e for e in usage.data if e.session_id == tc.model_id.split(":")[0]]
    trained_tokens = sum(e.event_info.token_count for e in mine
                         if e.event_info.type == "training")
    assert trained_tokens > 0 and any(e.event_info.type == "checkpoint" for e in mine)
    log = admin.get_audit_log(event_type="checkpoints").result()
    assert ("checkpoint_create", state) in [(e.event, e.tinker_path) for e in log.entries]
    storage = admin.get_current_checkpoint_storage_usage().result()
    assert sum(g.checkpoint_count for g in storage.data) >= 2


def test_a_server_side_custom_loss_trains_as_the_client_side_one(service):
    """create_custom_loss uploads the traced loss (client/config turns it on) and
    forward_backward_custom runs it in one server pass; the same function run client-side
    (a plain callable: forward, loss, backward) gives the same loss, metric and step."""

    def weighted_nll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/nll:sum": loss}

    handle = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1}).result()
    assert handle.loss_id is not None

    def client_side(data, logprobs_list):
        total = sum(weighted_nll(lp, d.loss_fn_inputs["weights"].to_torch())[0]
                    for d, lp in zip(data, logprobs_list, strict=True))
        return total, {"custom/nll:sum": float(total.detach())}

    data = [datum(p, c) for p, c in PAIRS]
    runs = [service.create_lora_training_client(BASE, rank=4, seed=31).result()
            for _ in range(2)]
    adam = types.AdamParams(learning_rate=1e-2)
    results = []
    for tc, loss in zip(runs, (handle, client_side), strict=True):
        results.append(tc.forward_backward_custom(data, loss).result())
        tc.optim_step(adam).result()
    server, client = results
    assert server.metrics["custom/nll:sum"] == pytest.approx(
        client.metrics["custom/nll:sum"], rel=1e-4)
    after = [np.concatenate([o["logprobs"].to_numpy() for o in tc.forward(
        data, "cross_entropy").result().loss_fn_outputs]) for tc in runs]
    np.testing.assert_allclose(after[0], after[1], atol=1e-5)
