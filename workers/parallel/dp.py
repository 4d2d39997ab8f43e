"""Data parallelism: D replicas of the (possibly tensor-parallel) model inside one worker.

Every rank runs every tick's plan, as under tensor parallelism; what differs between
replicas is the data each one takes:

  train    the datums of a tick's forward/forward_backward batch are dealt to the replicas,
           balanced by tokens (`deal`); each replica runs its share through the trainer,
           and one collective per batch (`gather`) brings every replica's per-job results
           to all of them: a job that failed on any replica fails on all (its gradients
           are committed nowhere), and rank 0 answers from the merged results
  optim    before a step, each adapter's LoRA gradients are summed over the replicas
           (`all_reduce_grads`: one flat all-reduce), so every replica applies the same
           step to the same weights; the losses are sums over tokens, so the sum of the
           replicas' gradients is the single-replica gradient
  sample   a request's `num_samples` sequences are split into contiguous blocks
           (`shares`), each replica decoding its block with the sequences' own indices (a
           sequence's random stream depends on its seed and index only, so the tokens do
           not depend on D); each tick ends with one exchange of the parts that finished
           (`workers.parallel.replicas`)

A replica is the ranks [d*T, (d+1)*T) of the worker's D*T ranks (T: tensor-parallel size);
replica d's tensor-parallel rank t meets the other replicas' rank t in its DP group. The
collectives above run in the DP group of each t, so they carry each tensor-parallel shard.
D = 1 (or `dp` None) runs exactly the single-replica code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DP:
    """This rank's replica and the group of the same tensor-parallel rank in every replica."""

    rank: int  # the replica, 0..size-1
    size: int
    group: dist.ProcessGroup | None = None


def active(dp: DP | None) -> bool:
    return dp is not None and dp.size > 1


def deal(sizes: list[int], replicas: int) -> list[int]:
    """The replica of each item (datum) of `sizes` tokens: largest first, each to the
    replica with the fewest tokens so far (the lowest index on a tie). Deterministic, so
    every rank deals alike."""
    load = [0] * replicas
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        d = min(range(replicas), key=lambda d: (load[d], d))
        owner[i] = d
        load[d] += sizes[i]
    return owner


def shares(n: int, replicas: int, start: int) -> list[tuple[int, int]]:
    """Contiguous blocks [lo, hi) of n sample indices, one per replica in order: n // D
    each, the remainder one more each to the replicas start, start+1, ... (mod D), so that
    requests of one sample go round the replicas."""
    extra = {(start + i) % replicas for i in range(n % replicas)}
    blocks, lo = [], 0
    for d in range(replicas):
        hi = lo + n // replicas + (d in extra)
        blocks.append((lo, hi))
        lo = hi
    return blocks


def all_reduce_grads(params: list[torch.Tensor], dp: DP | None) -> None:
    """Sum the params' gradients over the replicas, in place (a missing gradient counts
    as zeros, as the optimizer counts it)."""
    if not active(dp) or not params:
        return
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                      for p in params])
    dist.all_reduce(flat, group=dp.group)  # type: ignore[union-attr]
    for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = part.view_as(p)


def gather(obj: Any, dp: DP) -> list[Any]:
    """Every replica's `obj`, in replica order, on every replica (a collective)."""
    out: list[Any] = [None] * dp.size
    dist.all_gather_object(out, obj, group=dp.group)
    return out
