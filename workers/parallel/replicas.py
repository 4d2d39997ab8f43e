"""The executor's side of data parallelism (workers/parallel/dp.py says the scheme): a
training batch cut into this replica's share and the replicas' results merged, sample
requests split into blocks of sequences and joined when their last part finishes.

Every rank holds a `Replicas` and calls it in the same order (the plan is the same
everywhere), so the collectives pair up; rank 0's merged results are the answers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from protocol.jobs import Outcome
from workers.parallel.dp import DP, deal, gather, shares
from workers.sampling.sampler import SampleOutput
from workers.training.trainer import JobResult, Trainer, TrainJob


class ReplicaFailed(RuntimeError):
    """A replica's pass raised: every replica drops the batch alike (the executor then
    retries its jobs one by one, on every replica)."""


class Replicas:
    def __init__(self, dp: DP):
        self.dp = dp
        self.turn = 0  # the replica that takes the next request's first odd sample
        self.expected: dict[str, int] = {}  # open sample request -> parts it was split into
        self.parts: dict[str, dict[int, Any]] = {}  # ... -> replica -> its finished part
        self.others_busy = False  # another replica still decodes (the engine ticks on)
        # some replica decodes: the next tick trades parts even with no sample job (every
        # replica reads the same flags, so all trade or none)
        self.any_busy = False

    # --- training -------------------------------------------------------------------------
    def train(self, trainer: Trainer, jobs: list[TrainJob]) -> list[JobResult]:
        """Run this replica's datums of `jobs`; every job's merged result (alike on every
        replica). A job's gradients are committed on every replica or on none."""
        owner = iter(deal([len(d.tokens) for job in jobs for d in job.request.data],
                          self.dp.size))
        local: list[TrainJob] = []
        where: list[tuple[int, list[int]]] = []  # local job -> (its job, its datums' indices)
        for g, job in enumerate(jobs):
            mine = [k for k in range(len(job.request.data)) if next(owner) == self.dp.rank]
            if mine:
                request = dataclasses.replace(job.request,
                                              data=[job.request.data[k] for k in mine])
                local.append(TrainJob(request, job.config, job.slot))
                where.append((g, mine))
        everyone: list[Any] = []

        def agree(results: list[JobResult], raised: Exception | None) -> set[int]:
            mine = None if raised else [(g, k, r) for (g, k), r in zip(where, results,
                                                                        strict=True)]
            everyone.extend(gather((mine, None if raised is None else repr(raised)), self.dp))
            if why := next((e for _, e in everyone if e is not None), None):
                raise ReplicaFailed(f"a data-parallel replica's pass failed: {why}")
            failed = {g for part, _ in everyone for g, _, r in part if r.error is not None}
            return {i for i, (g, _) in enumerate(where) if g in failed}

        trainer.run(local, agree)
        merged = _merge(jobs, [part for part, _ in everyone])
        for job, result in zip(jobs, merged, strict=True):
            if result.error is None and not job.request.forward_only:
                # a run this replica had no datum of holds zero gradients, as the others
                # hold theirs: its state (and an offload's bytes) is alike everywhere
                for p in trainer.model.adapter_parameters(job.slot):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
        return merged

    # --- sampling -------------------------------------------------------------------------
    def share(self, request_id: str, num_samples: int) -> tuple[int, int]:
        """This replica's block [lo, hi) of a request's sample indices (maybe empty)."""
        blocks = shares(num_samples, self.dp.size, self.turn)
        self.turn = (self.turn + num_samples % self.dp.size) % self.dp.size
        self.expected[request_id] = sum(hi > lo for lo, hi in blocks)
        return blocks[self.dp.rank]

    def exchange(self, finished: list[tuple[str, SampleOutput | Outcome]], busy: bool
                 ) -> list[tuple[str, SampleOutput | Outcome]]:
        """Trade this tick's finished parts (a failure as its Outcome) with the other
        replicas; the requests whose parts are all in (or one of which failed), joined."""
        everyone = gather((finished, busy), self.dp)
        self.others_busy = any(b for d, (_, b) in enumerate(everyone) if d != self.dp.rank)
        self.any_busy = any(b for _, b in everyone)
        done = []
        for d, (parts, _) in enumerate(everyone):
            for request_id, part in parts:
                if request_id not in self.expected:  # answered already: a part failed
                    continue
                got = self.parts.setdefault(request_id, {})
                got[d] = part
                if isinstance(part, Outcome) or len(got) == self.expected[request_id]:
                    del self.expected[request_id], self.parts[request_id]
                    done.append((request_id, part if isinstance(part, Outcome) else _join(got)))
        return done


def _merge(jobs: list[TrainJob], parts: list[list[tuple[int, list[int], JobResult]]]
           ) -> list[JobResult]:
    """Each job's result from its replicas' parts: outputs in datum order, losses and
    metrics summed (the `:mean` metrics weighted by their datums), the first error."""
    merged = [JobResult() for _ in jobs]
    outputs: list[dict[int, dict]] = [{} for _ in jobs]
    for part in parts:
        for g, mine, r in part:
            m = merged[g]
            if r.error is not None:
                m.error = m.error or r.error
                continue
            outputs[g].update(zip(mine, r.outputs, strict=True))
            m.loss_sum += r.loss_sum
            for key, value in r.metrics.items():
                weight = len(mine) if key.endswith(":mean") else 1
                m.metrics[key] = m.metrics.get(key, 0.0) + value * weight
    for g, job in enumerate(jobs):
        m, n = merged[g], len(job.request.data)
        if m.error is not None:
            merged[g] = JobResult(error=m.error)
            continue
        m.outputs = [outputs[g][k] for k in range(n)]
        m.metrics = {k: v / n if k.endswith(":mean") else v for k, v in m.metrics.items()}
    return merged


def _join(parts: dict[int, SampleOutput]) -> SampleOutput:
    """A request's sequences in index order (the replicas' blocks are in replica order);
    its prompt's outputs from the first block's replica."""
    order = sorted(parts)
    return SampleOutput([s for d in order for s in parts[d].sequences], parts[order[0]].prompt)
