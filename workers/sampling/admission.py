"""Which waiting requests join the running batch, the KV cache blocks they take, and the
prompts they share; and the blocks running sequences take as they grow.

A prompt is prefilled once while any request of it runs (`SharedPrompt`): its blocks, and
the logits of its last position, belong to it, and every sample of every request with the
same tokens and adapter shares its full blocks and copies its last, part-filled block into a
block of its own before writing there. A request that joins later (the next of a group of
calls with one prompt, as the cookbook's RL loop sends them) needs no prefill at all. A
request that wants prompt logprobs prefills its own unless its prompt is prefilled in the
same tick (the logits of every position are not kept).

Admission keeps blocks for what sequences are expected to write (`Expect`): a request joins
when its prompt and its samples, each grown to the expected length, fit beside every running
sequence grown to its own (at least this tick's steps), with a block of headroom per
sequence. The expected length is learnt from the sequences that ended: traffic that stops
early packs many sequences into the cache, traffic that runs to max_tokens reserves them
whole (as contiguous regions would) instead of admitting what it must then preempt. When
`grow` still finds no free block, the running batch preempts its youngest request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from workers.sampling.kv_cache import BLOCK, KVCache, blocks_for
from workers.sampling.sequences import Request, Seq


@dataclass(eq=False)
class SharedPrompt:
    prefix: tuple  # (tokens, adapter key): Request.prefix
    blocks: list[int]  # its blocks, one reference each held here
    # [V] logits of its last position, once prefilled (0.3 MB for Qwen3's vocabulary in
    # bf16; at most one per running call, where one block of Qwen3-0.6B's cache is 3.5 MiB)
    last: torch.Tensor | None = None
    users: int = 0  # requests that hold it


def growth(length: int, region: int, max_steps: int, have: int, expected: int = 0) -> int:
    """Blocks a sequence of `length` cached tokens and `have` blocks still needs for a tick
    of `max_steps` decode steps (and the one extra step after it stops), or to reach
    `expected` tokens if that is more; never past its `region` (prompt + max_tokens)."""
    return max(0, blocks_for(min(max(length + max_steps + 1, expected), region)) - have)


class Expect:
    """The share of max_tokens a sequence is expected to generate: a moving average over
    the sequences that ended (each weighs WEIGHT), 1.0 until one does. A preemption shows
    it was too low (the short ones of a wave end first) and moves it halfway to 1."""

    WEIGHT = 1 / 32

    def __init__(self) -> None:
        self.share = 1.0

    def ended(self, generated: int, max_tokens: int) -> None:
        self.share += self.WEIGHT * (min(1.0, generated / max(1, max_tokens)) - self.share)

    def preempted(self) -> None:
        self.share += (1.0 - self.share) / 2

    def length(self, r: Request) -> int:
        """The cached tokens a sequence of `r` is expected to reach."""
        return len(r.spec.prompt) + math.ceil(self.share * r.spec.max_tokens)


class Prompts:
    """The prefilled prompts of running requests, by prefix."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.live: dict[tuple, SharedPrompt] = {}
        self.expect = Expect()

    def release(self, r: Request) -> None:
        """`r` ended or left the batch: its prompt's blocks go once no request holds them."""
        p, r.shared = r.shared, None
        if p is None:
            return
        p.users -= 1
        if p.users == 0:
            self.cache.release(p.blocks)
            if self.live.get(p.prefix) is p:
                del self.live[p.prefix]

    def join(self, waiting: deque[Request], running: list[Seq], max_sequences: int,
             max_steps: int) -> tuple[list[Request], list[SharedPrompt]]:
        """Take waiting requests, in arrival order, while they fit; give each its prompt
        and its sequences' blocks. Returns them and the prompts to prefill."""
        cache, expect = self.cache, self.expect
        free = cache.free_blocks - sum(growth(s.length, s.req.region, max_steps, len(s.blocks),
                                              expect.length(s.req)) for s in running)
        seqs, joined, fresh = len(running), [], dict[tuple, SharedPrompt]()
        while waiting:
            r = waiting[0]
            n, samples = len(r.spec.prompt), r.spec.num_samples
            if seqs + samples > max_sequences:
                break
            p = fresh.get(r.prefix) or (None if r.spec.scores_prompt
                                        else self.live.get(r.prefix))
            full, tail = divmod(n, BLOCK)
            need = (0 if p else blocks_for(n)) + samples * (tail > 0)
            need += samples * growth(n, r.region, max_steps, blocks_for(n), expect.length(r))
            if need > free - seqs:  # (the headroom) waits for running sequences to end
                break
            waiting.popleft()
            r.cache_hits = n if p else 0
            if p is None:
                blocks = cache.alloc(blocks_for(n))
                assert blocks is not None
                p = fresh[r.prefix] = SharedPrompt(r.prefix, blocks)
                self.live.setdefault(r.prefix, p)
            p.users += 1
            r.shared = p
            r.seqs = []
            for j in range(samples):
                own = cache.alloc(1) if tail else []
                assert own is not None
                cache.share(p.blocks[:full])
                r.seqs.append(Seq(r, r.spec.first_index + j, p.blocks[:full] + own))
            r.open = samples
            joined.append(r)
            free -= need
            seqs += samples
        return joined, list(fresh.values())


def grow(running: list[Seq], cache: KVCache, max_steps: int,
         grown: list[tuple[Seq, int]]) -> bool:
    """Give running sequences the blocks this tick's steps write to (each appended to
    `grown` with its first new block's index); False when one found none free. (Who is
    served first does not matter: a shortage preempts the youngest request whichever
    sequence met it, and its blocks go back.)"""
    for s in running:
        want = growth(s.length, s.req.region, max_steps, len(s.blocks))
        if want and s.stop_reason is None:
            got = cache.alloc(want)
            if got is None:
                return False
            grown.append((s, len(s.blocks)))
            s.blocks += got
    return True
