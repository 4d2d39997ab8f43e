"""The paged KV cache: a prompt's blocks shared by the samples of its request and by
requests with the same prompt and adapter (joining together or later), blocks taken as
sequences grow, admission reserving what sequences are expected to write, and the youngest
request preempted when none are left. Each gives exactly what unshared, unpreempted sampling
gives with the same seeds."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from tinker.proto.response_conv import deserialize_sample_response

from protocol.jobs import UserError
from tests.unit.test_decoding import run_alone, spec, with_adapters
from tests.unit.test_sampler import decode
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import BLOCK, blocks_for
from workers.sampling.sampler import adapter_of, outcome

LONG = [(13 * i + 5) % 500 + 1 for i in range(2 * BLOCK + 6)]  # 2 full blocks and a tail
EXACT = LONG[: 2 * BLOCK]  # whole blocks: no tail to copy


def unshared(model, s):
    """Each sample of `s` alone in a batch of its own (its index and seed kept): nothing to
    share with."""
    return [run_alone(model, dataclasses.replace(s, num_samples=1, first_index=s.first_index + j)
                      ).sequences[0] for j in range(s.num_samples)]


def assert_same(got, want, atol=1e-5):
    assert [g.tokens for g in got] == [w.tokens for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs),
                                   atol=atol, rtol=0)


def run(batch, steps=4):
    results = {}
    while batch.busy:
        results.update(batch.step(steps))
    return results


@pytest.mark.parametrize("prompt", [LONG, EXACT], ids=["tail", "whole-blocks"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_the_samples_of_a_request_share_its_prompts_blocks(tiny_model, prompt, fused):
    model = with_adapters(tiny_model, 1)
    s = spec(prompt, 5 if fused else 12, 1, temperature=1.0, seed=3,
             num_samples=4 if fused else 16)
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096,
                         fused=fused)
    batch.admit("x", s, adapter_of(model, 1))
    batch.step(0)  # joins and prefills, no decode step
    held = batch.cache.blocks - batch.cache.free_blocks
    # the prompt's blocks once, and one block per sample where it writes next: its copy of
    # the prompt's part-filled last one, or a new one
    assert held == blocks_for(len(prompt)) + s.num_samples
    results = run(batch)
    assert batch.cache.free_tokens == batch.cache.capacity
    assert_same(results["x"].sequences, unshared(model, s))


def test_requests_with_one_prompt_and_adapter_share_one_prefill(tiny_model):
    """Four calls of one prompt (the cookbook's group of rollouts: num_samples=1 each, seeds
    of their own), one of them asking for prompt logprobs; a fifth on another adapter and a
    sixth on the base model do not share with them."""
    model = with_adapters(tiny_model, 1, 2)
    specs = {i: spec(LONG, 8, 1, temperature=1.0, seed=10 + i, prompt_logprobs=i == 2)
             for i in range(4)}
    specs[4] = spec(LONG, 8, 2, temperature=1.0, seed=14)
    specs[5] = spec(LONG, 8, temperature=1.0, seed=15)
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    for key, s in specs.items():
        batch.admit(key, s, adapter_of(model, s.slot))
    batch.step(0)
    held = batch.cache.blocks - batch.cache.free_blocks
    assert held == 3 * blocks_for(len(LONG)) + 6  # three prompts; a tail for each call
    results = run(batch)
    for key, s in specs.items():
        alone = run_alone(model, s)
        assert_same(results[key].sequences, alone.sequences)
    torch.testing.assert_close(torch.tensor(results[2].prompt.logprobs[1:]),
                               torch.tensor(run_alone(model, specs[2]).prompt.logprobs[1:]),
                               atol=1e-5, rtol=0)
    # the first call of a prompt computed it; the others found it (the SDK's
    # prompt_cache_hit_tokens)
    hits = {key: out.prompt.cache_hit_tokens for key, out in results.items()}
    assert hits == {0: 0, 1: len(LONG), 2: len(LONG), 3: len(LONG), 4: 0, 5: 0}
    assert batch.prompt_tokens == {"prefilled": 3 * len(LONG), "shared": 3 * len(LONG)}
    assert results[0].prompt.logprobs is None or results[0].prompt.logprobs == []


def test_a_call_that_joins_later_shares_the_running_prompt_without_a_prefill(tiny_model):
    """The second call of a prompt arrives while the first decodes: it takes only its own
    blocks, and gets what it gets alone; once both end, the prompt's blocks are free. A
    third call, asking for prompt logprobs, prefills its own."""
    model = with_adapters(tiny_model, 1)
    first, second = (spec(LONG, 40, 1, temperature=1.0, seed=i) for i in (1, 2))
    third = spec(LONG, 6, 1, temperature=1.0, seed=3, prompt_logprobs=True)
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096)
    batch.admit("a", first, adapter_of(model, 1))
    results = dict(batch.step(4))
    held = batch.cache.blocks - batch.cache.free_blocks
    assert held == blocks_for(len(LONG)) + 1  # the prompt's; a's own
    batch.admit("b", second, adapter_of(model, 1))
    results.update(batch.step(0))
    assert batch.cache.blocks - batch.cache.free_blocks == held + 1  # b's own, no prompt
    batch.admit("c", third, adapter_of(model, 1))
    results.update(batch.step(0))
    assert batch.cache.blocks - batch.cache.free_blocks == held + 2 + blocks_for(len(LONG))
    results.update(run(batch))
    assert batch.cache.free_tokens == batch.cache.capacity and not batch.prompts.live
    for key, s in (("a", first), ("b", second), ("c", third)):
        assert_same(results[key].sequences, run_alone(model, s).sequences)
    assert [results[k].prompt.cache_hit_tokens for k in "abc"] == [0, len(LONG), 0]
    answer = deserialize_sample_response(outcome(results["b"], 0.0).proto)  # as the SDK reads
    assert answer.prompt_cache_hit_tokens == len(LONG) and answer.sequences[0].logprobs
    torch.testing.assert_close(torch.tensor(results["c"].prompt.logprobs[1:]),
                               torch.tensor(run_alone(model, third).prompt.logprobs[1:]),
                               atol=1e-5, rtol=0)


def test_a_full_cache_preempts_the_youngest_request_and_it_gets_the_same_answer(tiny_model):
    """Six requests whose prompts fit at once but whose generations do not: sequences grow
    until no block is left, the youngest go back to the queue and start again, and every
    request gets what it gets alone."""
    model = with_adapters(tiny_model, 1)
    specs = {i: spec([3 + i, 9, 27, 81], 3 * BLOCK, 1 if i % 2 else 0, temperature=1.0,
                     seed=i, num_samples=2) for i in range(6)}
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=14 * BLOCK)
    for key, s in specs.items():
        batch.admit(key, s, adapter_of(model, s.slot))
    batch.prompts.expect.share = 0.0  # as if every earlier sequence had stopped at once
    results, most = {}, 0
    while batch.busy:
        results.update(batch.step(8))
        most = max(most, len(batch.running))
    assert batch.preemptions > 0 and most >= 6  # they ran together, then some went back
    assert sorted(results) == list(specs)
    assert batch.cache.free_tokens == batch.cache.capacity
    for key, s in specs.items():
        assert_same(results[key].sequences, unshared(model, s))


def test_a_request_that_cannot_fit_the_cache_alone_is_refused_by_name(tiny_model):
    batch = RunningBatch(tiny_model, decode, [511], cuda_graphs=False, kv_tokens=9 * BLOCK)
    with pytest.raises(UserError, match=r"70 \+ 4 × 64 tokens needs 480 tokens .* holds 288"):
        batch.admit("x", spec(LONG, 64, num_samples=4), None)
    batch.admit("y", spec(LONG, 64, num_samples=2), None)  # 3 prompt + 2 × 3 blocks: fits
    assert run(batch)["y"].sequences[1].tokens


def test_a_crowded_cache_under_mixed_traffic_loses_no_block_and_changes_no_answer(tiny_model):
    """Calls of three prompts (two long, one short) on two adapters and the base model,
    arriving over many ticks into a cache too small for them all, some stopping early on a
    stop token: every call is answered as alone, and every block comes back."""
    model = with_adapters(tiny_model, 1, 2)
    rng = random.Random(4)
    prompts = [LONG, EXACT, [7, 8, 9]]
    calls = {}
    for i in range(12):
        calls[i] = spec(rng.choice(prompts), rng.randint(3, 200), rng.choice([0, 1, 2]),
                        temperature=1.0, seed=i, num_samples=rng.randint(1, 2),
                        stop_token_ids=[rng.randint(1, 511) for _ in range(2)])
    batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=20 * BLOCK)
    batch._prompts().expect.share = 0.0  # admission expects short completions: it overcommits
    results = {}
    arrivals = sorted(calls, key=lambda i: rng.random())
    while arrivals or batch.busy:
        for _ in range(rng.randint(0, 3)):
            if arrivals:
                i = arrivals.pop()
                batch.admit(i, calls[i], adapter_of(model, calls[i].slot))
        results.update(batch.step(rng.choice([1, 4, 8])))
        # every block held is one a running sequence or a running call's prompt reaches
        running = {s.req for s in batch.running}
        reached = {b for s in batch.running for b in s.blocks} | {
            b for r in running for b in r.shared.blocks}
        assert batch.cache.blocks - batch.cache.free_blocks == len(reached)
    assert sorted(results) == sorted(calls) and batch.preemptions > 0
    assert batch.cache.free_tokens == batch.cache.capacity and not batch.prompts.live
    for i, s in calls.items():  # (logprobs: up to 200 steps in batches of other sizes)
        assert_same(results[i].sequences, unshared(model, s), atol=5e-5)


def rl_wave(model, batch, waves, prompt_len, max_tokens, stops):
    """`waves` rounds of 4 calls × 4 samples of one prompt each (RL groups), every round
    sent once the last is answered; the most sequences that ran at once, per round."""
    rng, most = random.Random(1), []
    for w in range(waves):
        prompt = [rng.randrange(1, 511) for _ in range(prompt_len)]
        for j in range(4):
            batch.admit((w, j), spec(prompt, max_tokens, -1, temperature=1.0, seed=4 * w + j,
                                     num_samples=4, stop_token_ids=stops), None)
        most.append(0)
        while batch.busy:
            batch.step(4)
            most[-1] = max(most[-1], len(batch.running))
    return most


def test_admission_reserves_whole_sequences_for_traffic_that_runs_to_max_tokens(tiny_model):
    """Completions that never stop: admission reserves each sequence whole (4 blocks of its
    own and a block of headroom; it learns nothing else from sequences that write all of
    max_tokens), so none is preempted and no decode step is thrown away. Told that
    completions stop at once, it admits all 16 where 8 fit whole, and must preempt."""
    cache = 2 + 40  # the prompt's 2 blocks once, 40 for the sequences
    batch = RunningBatch(tiny_model, decode, [511], cuda_graphs=False, kv_tokens=cache * BLOCK)
    assert rl_wave(tiny_model, batch, 3, 2 * BLOCK, 4 * BLOCK, []) == [8, 8, 8]
    assert batch.preemptions == 0 and batch.prompts.expect.share == 1.0
    greedy = RunningBatch(tiny_model, decode, [511], cuda_graphs=False, kv_tokens=cache * BLOCK)
    greedy._prompts().expect.share = 0.0  # a block for the tick's steps, one of headroom
    assert rl_wave(tiny_model, greedy, 1, 2 * BLOCK, 4 * BLOCK, []) == [16]
    assert greedy.preemptions > 0


def test_admission_packs_more_sequences_once_completions_are_seen_to_stop_early(tiny_model):
    """Completions that end early on a stop token (about one step in 40): as they end, the
    expected share of max_tokens falls, and later rounds run more sequences at once than
    whole reservations (8, as above) allow, every block coming back."""
    batch = RunningBatch(tiny_model, decode, [511], cuda_graphs=False, kv_tokens=42 * BLOCK)
    stops = random.Random(2).sample(range(1, 511), 12)
    most = rl_wave(tiny_model, batch, 4, 2 * BLOCK, 4 * BLOCK, stops)
    assert max(most[1:]) > 8 and batch.prompts.expect.share < 0.7, most
    assert batch.cache.free_tokens == batch.cache.capacity
