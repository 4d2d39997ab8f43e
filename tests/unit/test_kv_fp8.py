"""A float8 KV cache (sample_kv_dtype=fp8): a byte per key and value, sampled logprobs near
the model's own, shared prompts and preemption as exact as in the model's dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tinker.proto.response_conv import deserialize_sample_response

from config import SettingsError, load_settings
from tests.unit.test_decoding import spec, with_adapters
from tests.unit.test_executor import job
from tests.unit.test_kv_sharing import LONG, assert_same, run
from tests.unit.test_sampler import decode
from workers.executor import Executor
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import BLOCK, KV_DTYPES, KVCache, kv_dtype_problem
from workers.sampling.sampler import adapter_of
from workers.scheduler import Plan

FP8 = KV_DTYPES["fp8"]


def sample(model, s, fused=False, kv_dtype=FP8, kv_tokens=4096):
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=kv_tokens,
                         fused=fused, kv_dtype=kv_dtype)
    batch.admit("x", s, adapter_of(model, s.slot))
    out = run(batch)["x"]
    assert batch.cache.free_tokens == batch.cache.capacity
    return out, batch


def scored(model, prompt, seq, slot, kv_dtype):
    """The logprobs of `seq`'s tokens after `prompt`, from a prefill (over keys and values
    rounded as the cache stores them)."""
    out, _ = sample(model, spec(prompt + seq.tokens, 1, slot, prompt_logprobs=True),
                    kv_dtype=kv_dtype)
    return torch.tensor(out.prompt.logprobs[len(prompt):])


def test_the_setting_names_its_choices_and_the_cache_stores_a_byte_a_value(tiny_model):
    with pytest.raises(SettingsError, match="sample_kv_dtype='int4' must be one of model, fp8"):
        load_settings(env={}, sample_kv_dtype="int4").validate()
    assert load_settings(env={}, sample_kv_dtype="fp8").validate().sample_kv_dtype == "fp8"
    fp8 = KVCache.for_model(tiny_model, 1000, 8, FP8)
    plain = KVCache.for_model(tiny_model, 1000, 8)
    assert fp8.capacity == plain.capacity
    assert fp8.k[0].dtype == fp8.v[1].dtype == FP8 and plain.k[0].dtype == torch.float32
    assert fp8.k[0].nbytes * 4 == plain.k[0].nbytes


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_decoded_token_has_the_logprob_a_prefill_gives_it(tiny_model, fused):
    """Each sampled token's logprob (decode steps reading the float8 cache) equals the same
    token's scored in a prompt (a prefill over keys and values rounded to float8), as in the
    model's dtype; and float8 moves it from the model's dtype's by a few hundredths."""
    model = with_adapters(tiny_model, 1)
    s = spec(LONG, 24, 1, temperature=1.0, seed=7, num_samples=3)
    out, _ = sample(model, s, fused=fused)
    got = torch.cat([torch.tensor(q.logprobs) for q in out.sequences])
    same = torch.cat([scored(model, LONG, q, 1, FP8) for q in out.sequences])
    plain = torch.cat([scored(model, LONG, q, 1, None) for q in out.sequences])
    torch.testing.assert_close(got, same, atol=1e-4, rtol=0)
    assert 1e-3 < (got - plain).abs().mean() < 0.1


def test_fp8_shared_prompts_and_preemption_give_the_unshared_answers(tiny_model):
    """The samples of a prompt share its float8 blocks (the part-filled one copied), and in
    a cache too small for what joined, the youngest requests go back to the queue and start
    again: the same tokens and logprobs as each alone in a float8 cache."""
    model = with_adapters(tiny_model, 1)
    s = spec(LONG, 10, 1, temperature=1.0, seed=3, num_samples=6)
    shared, _ = sample(model, s)
    alone = [sample(model, dataclasses.replace(s, num_samples=1, first_index=j))[0]
             .sequences[0] for j in range(s.num_samples)]
    assert_same(shared.sequences, alone)

    specs = {i: spec([3 + i, 9, 27, 81], 3 * BLOCK, 1, temperature=1.0, seed=i, num_samples=2)
             for i in range(6)}
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_dtype=FP8,
                         kv_tokens=14 * BLOCK)
    for key, one in specs.items():
        batch.admit(key, one, adapter_of(model, 1))
    batch.prompts.expect.share = 0.0  # as if earlier sequences had stopped at once: all join
    crowded = run(batch, steps=8)
    assert batch.preemptions > 0
    for key, one in specs.items():
        assert_same(crowded[key].sequences, sample(model, one)[0].sequences)


def test_the_worker_setting_gives_the_sampler_a_float8_cache(tiny_model, tmp_path):
    settings = load_settings(env={}, data_dir=str(tmp_path), sample_kv_dtype="fp8")
    ex = Executor(tiny_model, settings, decode=lambda ids: "", eos_token_ids=[511])
    body = {"prompt": LONG, "num_samples": 2, "max_tokens": 5, "temperature": 1.0, "top_k": -1,
            "top_p": 1.0, "seed": 4, "stop_strings": [], "stop_token_ids": [],
            "stop_at_eos": False, "prompt_logprobs": False, "topk_prompt_logprobs": 0}
    answer = ex.run(Plan(samples=[job("sample", body, rid="s")]))["s"]
    assert ex.sampling.cache.k[0].dtype == FP8
    got = deserialize_sample_response(answer.proto).sequences
    want, _ = sample(tiny_model, spec(LONG, 5, temperature=1.0, seed=4, num_samples=2))
    assert [g.tokens for g in got] == [w.tokens for w in want.sequences]


def test_a_gpu_without_float8_conversions_is_refused_by_name():
    cuda = torch.device("cuda:0")
    why = kv_dtype_problem(FP8, cuda, capability=(8, 0))  # an A100
    assert why is not None and "compute capability 8.9" in why and "is 8.0" in why
    assert kv_dtype_problem(FP8, cuda, capability=(9, 0)) is None  # Hopper
    assert kv_dtype_problem(None, cuda, capability=(8, 0)) is None  # the model's dtype
    assert kv_dtype_problem(FP8, torch.device("cpu")) is None
