"""KV cache capacity of the sampler's paged cache against the contiguous regions it replaced,
on RL-shaped traffic (CPU; the accounting does not depend on the model's size).

Workload: GROUPS prompts of PROMPT tokens, each sent as 16 calls of num_samples=1 (the
cookbook's RL groups), max_tokens MAX; completions end early on stop tokens (a random tiny
Qwen3 at temperature 1 draws one of STOPS ids at about STOPS/512 odds a step), as RL
completions end at EOS. Everything runs at once (no preemption); each figure is the most
the cache held at any tick, i.e. the cache this workload needs to run at once:

  regions     the contiguous regions the paged cache replaced: prompt + max_tokens for
              every running sequence (the baseline, counted beside the run)
  unshared    the paged cache if each sequence had its own copy of its prompt
  paged       the paged cache (whole blocks: prompts once, growth as written)
  4B GiB      regions and paged in Qwen3-4B's KV bytes (36 layers, 8 KV heads of 128, bf16)

Then a cache too small for the workload (half its sequences fit whole), completions running
to max_tokens (as random weights give, and as long reasoning does): admission as built,
which reserves what sequences are expected to write (learnt from those that ended), beside
the baseline that reserves only a tick's steps (the expected share held at 0): decode steps
run (sequences × steps, the thrown-away ones of preempted requests included, against the
steps the answers hold), preemptions, and the most sequences that ran at once.

    python -m benchmarks.kv_capacity
"""

from __future__ import annotations

import argparse
import random

import torch

from tests.conftest import tiny_qwen3_config
from workers.model import LoraModel
from workers.sampling.admission import Expect
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import BLOCK, blocks_for
from workers.sampling.sampler import SampleSpec

QWEN3_4B_TOKEN_BYTES = 2 * 36 * 8 * 128 * 2


def run(model: LoraModel, groups: int, prompt: int, max_tokens: int, stops: int
        ) -> tuple[int, int, int, float]:
    """The most tokens (regions, unshared, paged) held at any tick; the mean completion."""
    rng = random.Random(0)
    stop_ids = rng.sample(range(1, 512), stops)
    batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=16 * groups,
                         kv_tokens=16 * groups * (prompt + max_tokens) + BLOCK,
                         cuda_graphs=False, fused=False)
    for g in range(groups):
        tokens = [rng.randrange(1, 512) for _ in range(prompt)]
        for j in range(16):
            spec = SampleSpec(tokens, 1, max_tokens, -1, temperature=1.0, seed=16 * g + j,
                              stop_token_ids=stop_ids, stop_at_eos=False)
            batch.admit((g, j), spec, None)
    peak, lengths = [0, 0, 0], []
    while batch.busy:
        for _, out in batch.step(8):
            lengths += [len(s.tokens) for s in out.sequences]
        held = batch.cache.capacity - batch.cache.free_tokens
        regions = sum(s.req.region for s in batch.running)
        full = prompt // BLOCK * BLOCK  # the tokens a prompt's sequences share
        unshared = held + full * (len(batch.running) - len(batch.prompts.live))
        peak = [max(a, b) for a, b in zip(peak, (regions, unshared, held), strict=True)]
    return (*peak, sum(lengths) / len(lengths))


class _TickOnly(Expect):
    """Admission as it was: the expected share held at 0, whatever ends or is preempted."""

    share = 0.0

    def __init__(self) -> None:
        pass

    def ended(self, generated: int, max_tokens: int) -> None:
        pass

    def preempted(self) -> None:
        pass


def overcommit(model: LoraModel, groups: int, prompt: int, max_tokens: int, learn: bool
               ) -> tuple[int, int, int, int]:
    """(decode steps run, steps the answers hold, preemptions, most running) for `groups`
    × 16 never-stopping calls in a cache that holds half of them whole."""
    rng = random.Random(0)
    own = blocks_for(prompt + max_tokens) - prompt // BLOCK  # past the shared prompt blocks
    half = groups * blocks_for(prompt) + 8 * groups * own
    batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=16 * groups,
                         kv_tokens=half * BLOCK, cuda_graphs=False, fused=False)
    for g in range(groups):
        tokens = [rng.randrange(1, 512) for _ in range(prompt)]
        for j in range(16):
            batch.admit((g, j), SampleSpec(tokens, 1, max_tokens, -1, temperature=1.0,
                                           seed=16 * g + j, stop_at_eos=False), None)
    if not learn:
        batch.prompts.expect = _TickOnly()
    steps, most = 0, 0
    while batch.busy:
        running = len(batch.running)
        batch.step(8)
        steps += 8 * max(running, len(batch.running))
        most = max(most, len(batch.running))
    return steps, 16 * groups * max_tokens, batch.preemptions, most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--prompt", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--stops", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--overcommit-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32,
                                  seed=0)
    rows = []
    for prompt in args.prompt:
        for stops in args.stops:
            regions, unshared, paged, mean = run(model, args.groups, prompt,
                                                 args.max_tokens, stops)
            rows.append(f"{args.groups:>7}×16{prompt:>8}{args.max_tokens:>6}{stops:>7}"
                        f"{mean:>10.0f}{regions:>10}{unshared:>10}{paged:>9}"
                        f"{regions / paged:>8.2f}x{regions * QWEN3_4B_TOKEN_BYTES / 2**30:>9.2f}"
                        f"{paged * QWEN3_4B_TOKEN_BYTES / 2**30:>8.2f}")
            print(rows[-1], flush=True)
    print(f"\nKV cache tokens at their most, RL groups (16 calls a prompt), blocks of {BLOCK};"
          f" regions = the contiguous cache's reservation (the baseline)")
    print(f"{'calls':>10}{'prompt':>8}{'max':>6}{'stops':>7}{'mean out':>10}"
          f"{'regions':>10}{'unshared':>10}{'paged':>9}{'ratio':>9}{'4B GiB':>9}{'paged':>8}")
    for r in rows:
        print(r)
    print(f"\n{args.groups}×16 calls of max_tokens {args.overcommit_tokens}, never stopping, "
          f"in a cache for half of them whole")
    print(f"{'prompt':>7}{'admission':>32}{'decode steps':>14}{'of which kept':>15}"
          f"{'preemptions':>13}{'most running':>14}")
    for prompt in args.prompt:
        for learn, name in ((False, "a tick's steps (baseline)"), (True, "expected length")):
            steps, kept, preempted, most = overcommit(model, args.groups, prompt,
                                                      args.overcommit_tokens, learn)
            print(f"{prompt:>7}{name:>32}{steps:>14,}{100 * kept / steps:>14.0f}%"
                  f"{preempted:>13}{most:>14}", flush=True)


if __name__ == "__main__":
    main()
