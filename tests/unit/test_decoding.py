"""The running batch: requests join and leave between decode steps, the cache frees, the
batch stays bounded, and what a request gets does not depend on what else runs beside it."""

from __future__ import annotations

import json
import time

import pytest
import torch
from tinker.proto.response_conv import deserialize_forward_backward_output

from tests.unit.test_engine import create_body, start_engine
from tests.unit.test_executor import fwdbwd_body, job
from tests.unit.test_sampler import P1, P2, P3, decode, reference_greedy
from workers.lora import BASE_SLOT
from workers.model import AdapterSpec
from workers.sampling import choose, decoding
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import BLOCK, KVCache, slots
from workers.sampling.sampler import SampleSpec, adapter_of


def with_adapters(model, *slots):
    for slot in slots:
        model.add_adapter(slot, AdapterSpec(rank=4 + 4 * slot, alpha=16),
                          torch.Generator().manual_seed(slot))
        for w in model.adapter_weights(slot).values():
            with torch.no_grad():
                w.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(10 + slot))
    return model


def spec(prompt, n, slot=BASE_SLOT, **kw) -> SampleSpec:
    kw.setdefault("temperature", 0.0)
    return SampleSpec(prompt, kw.pop("num_samples", 1), n, slot, stop_at_eos=False, **kw)


def run_alone(model, s: SampleSpec):
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    batch.admit("x", s, adapter_of(model, s.slot))
    out = []
    while batch.busy:
        out += batch.step(4)
    ((_, result),) = out
    return result


def test_the_cache_hands_out_blocks_and_takes_shared_ones_back_at_the_last_release():
    cache = KVCache(1, 4 * BLOCK + 7, 1, 2, torch.float32, torch.device("cpu"))
    assert cache.blocks == 5 and cache.capacity == 5 * BLOCK  # whole blocks, rounded up
    a, b = cache.alloc(2), cache.alloc(3)
    assert sorted(a + b) == [0, 1, 2, 3, 4] and cache.alloc(1) is None
    cache.share(a)  # a second sequence reads a's blocks
    cache.release(a)
    assert cache.free_blocks == 0  # still held by the other
    cache.release(a + b)
    assert cache.free_tokens == cache.capacity and len(cache.alloc(5)) == 5
    assert slots([4, 0], BLOCK - 1, BLOCK + 1) == [5 * BLOCK - 1, 0]


def test_gumbel_noise_is_finite_where_the_hash_is_all_ones():
    """Stream 7098 at step 0 hashes id 279 to all ones in the bits the uniform is drawn
    from. A 24-bit uniform rounded to 1 there in float32, and the noise to +inf: the id won
    whatever its logit (about one sampled step in 110 at a 150k vocabulary). The 23-bit
    one stays below 1: the noise is -log(-log(1 - 2^-24)) ≈ 16.6, and a logit of -20 loses."""
    base = choose._mix(torch.tensor([7098]) * choose._GOLDEN)
    assert (choose._mix(base ^ 279) >> 40) & ((1 << 24) - 1) == (1 << 24) - 1
    noise = choose.gumbel_noise(torch.tensor([7098]), torch.tensor([0]), 1000)
    assert torch.isfinite(noise).all() and 16.5 < noise[0, 279] < 16.7
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(5))
    logits[0, 279] = -20.0
    token, _ = choose.choose(logits, torch.ones(1), torch.tensor([7098]),
                             torch.zeros(1, dtype=torch.long))
    assert token.item() != 279


def test_requests_join_mid_generation_and_get_what_they_get_alone(tiny_model):
    model = with_adapters(tiny_model, 1, 2)
    specs = {"a": spec(P1, 12, 1), "b": spec(P2, 5, BASE_SLOT, prompt_logprobs=True),
             "c": spec(P3, 7, 2, temperature=0.8, top_k=20, seed=5, num_samples=3),
             "d": spec(P2, 4, 1, temperature=1.0, seed=9, num_samples=2)}
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    results, sizes = {}, []
    batch.admit("a", specs["a"], adapter_of(model, 1))
    for step in range(40):
        if step == 2:  # b and c arrive while a is decoding
            batch.admit("b", specs["b"], None)
            batch.admit("c", specs["c"], adapter_of(model, 2))
        if step == 6:
            batch.admit("d", specs["d"], adapter_of(model, 1))
        results.update(batch.step(1))
        sizes.append(len(batch.running))
    assert not batch.busy and sorted(results) == ["a", "b", "c", "d"]
    assert max(sizes) >= 5  # they really overlapped (a, b, c's three samples, ...)
    assert batch.cache.free_tokens == batch.cache.capacity  # every region came back
    for key, s in specs.items():
        alone = run_alone(model, s)
        for got, want in zip(results[key].sequences, alone.sequences, strict=True):
            assert got.tokens == want.tokens
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                       atol=1e-5, rtol=0)
    assert results["a"].sequences[0].tokens == reference_greedy(model, P1, 12, slot=1)
    b_alone = run_alone(model, specs["b"])
    torch.testing.assert_close(torch.tensor(results["b"].prompt.logprobs[1:]),
                               torch.tensor(b_alone.prompt.logprobs[1:]), atol=1e-5, rtol=0)


def test_rows_that_end_mid_tick_idle_and_the_rest_match_running_alone(tiny_model):
    """Many decode steps per tick: the host reads tokens a step late, ended rows idle on the
    scratch token, and the rows are rebuilt once half idle; nobody's output changes."""
    model = with_adapters(tiny_model, 1)
    specs = {i: spec([3 + i, 7, 11], 2 + 3 * i, 1 if i % 2 else BASE_SLOT,
                     temperature=1.0 if i % 3 else 0.0, seed=i) for i in range(6)}
    stopper = run_alone(model, specs[5]).sequences[0].tokens[3]  # ends request 5 early
    specs[5] = spec([8, 7, 11], 17, 1, temperature=1.0, seed=5, stop_token_ids=[stopper])
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    for key, s in specs.items():
        batch.admit(key, s, adapter_of(model, s.slot))
    results, rebuilds = {}, set()
    while batch.busy:
        results.update(batch.step(8))
        rebuilds.add(id(batch.steady))
    assert sorted(results) == list(specs) and len(rebuilds) >= 2
    assert batch.cache.free_tokens == batch.cache.capacity
    for key, s in specs.items():
        got, want = results[key].sequences[0], run_alone(model, s).sequences[0]
        assert (got.tokens, got.stop_reason) == (want.tokens, want.stop_reason)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                   atol=1e-5, rtol=0)
    assert results[5].sequences[0].stop_reason == "stop"


def test_a_row_that_ends_at_a_whole_block_idles_beside_longer_running_rows(tiny_model):
    """Prompt + max_tokens a whole number of blocks (the RL recipe's 64 + 1024): the row that
    ends first idles while later rows of the same shape run on, and the next steps must not
    read its table past the end (its last position is one past its blocks). The H100 run of
    the recipe failed here with a device-side assert."""
    specs = {"first": spec(list(range(1, 17)), 2 * BLOCK - 16, temperature=1.0, seed=1),
             "later": spec(list(range(2, 18)), 2 * BLOCK - 16, temperature=1.0, seed=2,
                           num_samples=3)}
    batch = RunningBatch(tiny_model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    batch.admit("first", specs["first"], None)
    results = dict(batch.step(8) + batch.step(8))
    batch.admit("later", specs["later"], None)
    idled = False
    while batch.busy:
        results.update(batch.step(8))
        idled |= batch.steady is not None and 0 < len(batch.running) < len(batch.steady.rows)
    assert idled and sorted(results) == ["first", "later"]
    for key, s in specs.items():
        for got, want in zip(results[key].sequences, run_alone(tiny_model, s).sequences,
                             strict=True):
            assert got.tokens == want.tokens


def test_the_model_still_trains_after_sampling_with_an_adapter(tiny_model):
    """Sampling lays LoRA factors beside the base weights (under inference_mode); the base
    weights it moves must stay usable by a training pass afterwards."""
    model = with_adapters(tiny_model, 1)
    run_alone(model, spec(P1, 3, 1))
    out = model.packed_pass([P1], [P1[1:] + [7]], [1], [True], lambda i, off, lp: -lp)
    assert all(g is not None and g.abs().sum() > 0 for g in out.grads[1])


def test_the_batch_never_exceeds_its_sequence_limit_and_the_rest_wait(tiny_model):
    batch = RunningBatch(tiny_model, decode, [511], max_num_sequences=3, cuda_graphs=False,
                         kv_tokens=4096)
    for i in range(5):
        batch.admit(i, spec([1 + i, 2, 3], 3 + i, num_samples=2, temperature=1.0, seed=i),
                    None)
    done, sizes = {}, []
    while batch.busy:
        done.update(batch.step(1))
        sizes.append(len(batch.running))
    assert sorted(done) == [0, 1, 2, 3, 4] and max(sizes) <= 3
    assert [len(done[i].sequences[0].tokens) for i in range(5)] == [3, 4, 5, 6, 7]


def test_fail_all_answers_every_request_once_and_frees_the_cache(tiny_model):
    batch = RunningBatch(tiny_model, decode, [511], max_num_sequences=3, cuda_graphs=False,
                         kv_tokens=4096)
    for i in range(3):  # two requests run (2 + 1 samples), one waits
        batch.admit(i, spec([1 + i, 2, 3], 20, num_samples=2 - i % 2), None)
    batch.step(2)
    assert len(batch.running) == 3 and len(batch.waiting) == 1
    failed = batch.fail_all(RuntimeError("boom"))
    assert sorted(k for k, _ in failed) == [0, 1, 2]
    assert all(str(e) == "boom" for _, e in failed) and not batch.busy
    assert batch.cache.free_tokens == batch.cache.capacity


def test_a_failed_prefill_answers_the_requests_it_took_from_the_queue(tiny_model,
                                                                    monkeypatch):
    """The prefill raises (an out-of-memory, say) after its requests left the queue and
    before they run: fail_all still answers them, and their blocks come back."""
    batch = RunningBatch(tiny_model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    batch.admit(0, spec([1, 2, 3], 20), None)
    batch.step(2)  # request 0 runs
    for i in (1, 2):
        batch.admit(i, spec(list(range(1, 40 + i)), 5, num_samples=2), None)

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(decoding, "forward", boom)
    with pytest.raises(RuntimeError):
        batch.step(2)
    failed = batch.fail_all(RuntimeError("out of memory"))
    assert sorted(k for k, _ in failed) == [0, 1, 2] and not batch.busy
    assert batch.cache.free_tokens == batch.cache.capacity and not batch.prompts.live


def test_a_request_keeps_the_weights_it_was_admitted_with(tiny_model):
    """A sampler slot reloaded (or a training adapter updated) mid-generation does not
    change a request already running: it samples the snapshot it started with."""
    model = with_adapters(tiny_model, 1)
    s = spec(P1, 10, 1)
    before = run_alone(model, s)
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    batch.admit("x", s, adapter_of(model, 1))
    out = batch.step(3)
    new = {name: (w.A.detach() * 2, w.B.detach() * -1)
           for name, w in model.adapter_weights(1).items()}
    model.set_adapter_weights(1, model.adapters[1], new)  # the slot now holds other weights
    while batch.busy:
        out += batch.step(3)
    assert out[0][1].sequences[0].tokens == before.sequences[0].tokens
    assert run_alone(model, s).sequences[0].tokens != before.sequences[0].tokens


def test_training_calls_interleave_with_a_long_generation(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path, sample_steps_per_tick=4)
    assert engine.submit(job("create_model", create_body("m"), "m")).result(10).ok
    body = {"prompt": [5, 6], "num_samples": 2, "max_tokens": 400, "temperature": 1.0,
            "top_k": -1, "top_p": 1.0, "seed": 1, "stop_strings": [], "stop_token_ids": [],
            "stop_at_eos": False, "prompt_logprobs": False, "topk_prompt_logprobs": 0,
            "adapter_dir": None}
    long = engine.submit(job("sample", body, rid="long"))
    time.sleep(0.2)
    train = engine.submit(job("forward_backward", fwdbwd_body("m", 1, [1, 2, 3]), "m", 1))
    out = train.result(30)
    assert out.ok and deserialize_forward_backward_output(out.proto).metrics["loss:sum"] > 0
    assert not long.done()  # the training call did not wait for the generation to end
    answer = long.result(120)
    assert answer.ok, json.dumps(answer.json)
