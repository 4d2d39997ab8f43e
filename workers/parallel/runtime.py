"""The worker over N ranks: rank 0 (the Celery worker's engine) leads, ranks 1..N-1 follow.

N = D × T: D data-parallel replicas (workers/parallel/dp.py) of T tensor-parallel ranks
(workers/parallel/tp.py); rank r is replica r // T's tensor-parallel rank r % T.

    leader = Leader.start(settings, device, Executor.build)
                                      # spawns the followers (one process per GPU), each
                                      # building its executor, and joins the process group
                                      # (NCCL on GPUs, gloo on the CPU) and its subgroups
    seed = leader.send(plan)          # before each tick: every follower gets the plan
    follow(rank, ...)                 # a follower: build the same sharded executor, then
                                      # run every plan it is sent, in order

Every rank runs the same plan through the same code, so the ranks meet in the same
collectives; the tick's seed (for unseeded adapters and samples) travels with the plan so
their random choices agree too, and memory-dependent sizes (micro-batch budget, KV cache)
are the minimum over the ranks. Only rank 0 answers: the followers' outcomes are dropped.

Failure: a rank that dies takes the worker down, never into a hang. The leader's watchdog
sees a follower exit and ends the worker process with a message naming the rank (its
Celery tasks are acknowledged late, so they run again after the restart); a follower
exits when the leader's pipe closes or its parent process is gone.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from workers.parallel.dp import DP
from workers.parallel.tp import TP

log = logging.getLogger(__name__)
TIMEOUT = dt.timedelta(minutes=10)  # a collective this late means a rank is stuck


@dataclass(frozen=True)
class Ranks:
    """A rank's place in the worker: its global rank, its tensor-parallel group (the ranks
    of its replica) and its data-parallel group (its peers in the other replicas)."""

    rank: int
    tp: TP
    dp: DP


@dataclass
class Leader:
    ranks: Ranks
    pipes: list[Any]
    procs: list[mp.process.BaseProcess]
    dead: threading.Event = field(default_factory=threading.Event)  # set: closing
    # the ticks' seeds: from settings.random_seed when set (a replayable run), else the OS's
    seeds: random.Random = field(default_factory=random.SystemRandom)

    @classmethod
    def start(cls, settings: Any, device: torch.device, build: Callable[..., Any]) -> Leader:
        """Spawn ranks 1..N-1, each calling `build(settings, rank=, join=)` for its executor
        (a picklable callable, `Executor.build`: this module imports no executor), and join
        them as rank 0."""
        t, n = settings.tensor_parallel_size, settings.world_size
        if device.type == "cuda" and torch.cuda.device_count() < n:
            raise ValueError(f"data_parallel_size={n // t} × tensor_parallel_size={t} needs "
                             f"{n} GPUs; {torch.cuda.device_count()} are visible")
        ctx = mp.get_context("spawn")
        address = f"tcp://127.0.0.1:{_free_port()}"
        pipes, procs = [], []
        for rank in range(1, n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=follow, args=(rank, n, t, address, settings, theirs,
                                                    build),
                               name=f"tinkerq-rank{rank}", daemon=True)
            proc.start()
            pipes.append(mine)
            procs.append(proc)
        ranks = _join(0, n, t, address, device)
        leader = cls(ranks, pipes, procs, seeds=random.Random(settings.random_seed)
                     if settings.random_seed >= 0 else random.SystemRandom())
        threading.Thread(target=leader._watch, name="tinkerq-rank-watchdog", daemon=True).start()
        log.info("%d ranks: %d data-parallel replica(s) × %d tensor-parallel rank(s) (%s)",
                 n, n // t, t, dist.get_backend())
        return leader

    def send(self, plan: Any) -> int:
        """Hand the tick's plan to every follower; the tick's seed, the same everywhere."""
        seed = self.seeds.getrandbits(62)
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                pipe.send((seed, plan))
            except OSError:  # its end is closed: the follower is gone
                self._stop(rank)
        return seed

    def close(self) -> None:
        """Let the followers go (they exit when their pipe closes) and leave the group."""
        self.dead.set()  # the watchdog stands down
        for pipe in self.pipes:
            pipe.close()
        for proc in self.procs:
            proc.join(timeout=30)
        # Once NCCL collectives have been captured in CUDA graphs (the decode step), leaving
        # the group can hang in ncclCommDestroy (pytorch/pytorch#115388): give it a few
        # seconds, then let the process exit with the group in place.
        leave = threading.Thread(target=dist.destroy_process_group, daemon=True)
        leave.start()
        leave.join(timeout=10)

    def check(self, grace: float = 0.0) -> None:
        """Stop the worker (as the watchdog would) if a follower has exited or exits within
        `grace` seconds."""
        deadline = time.monotonic() + grace
        for rank, proc in enumerate(self.procs, start=1):
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if not proc.is_alive() and not self.dead.is_set():
                self._stop(rank)

    def _watch(self) -> None:
        while not self.dead.is_set():
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive() and not self.dead.is_set():
                    self._stop(rank)
            time.sleep(0.5)

    def _stop(self, rank: int) -> None:
        """A follower died: the ranks can no longer meet, so the whole worker ends (rather
        than hang in a collective); its unacknowledged tasks run again after the restart."""
        proc = self.procs[rank - 1]
        proc.join(timeout=1)
        log.critical("rank %d exited (code %s); the worker stops so that it restarts whole",
                     rank, proc.exitcode)
        logging.shutdown()
        os._exit(70)


def follow(rank: int, size: int, tp_size: int, address: str, settings: Any, pipe: Any,
           build: Callable[..., Any]) -> None:
    """A follower rank's whole life: join, build the executor, run plans until told off."""
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    executor = build(settings, rank=rank, join=lambda device: _join(
        rank, size, tp_size, address, device))
    while True:
        try:
            seed, plan = pipe.recv()
        except (EOFError, OSError):
            log.info("rank %d: the leader is gone; exiting", rank)
            os._exit(0)
        executor.run_here(plan, seed)


def _join(rank: int, size: int, tp_size: int, address: str, device: torch.device) -> Ranks:
    """Join the worker's process group, then its subgroups: the ranks of each replica (for
    tensor parallelism) and each tensor-parallel rank's peers across the replicas (for
    data parallelism). Every rank makes every subgroup, in the same order."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=TIMEOUT)
    replicas, (replica, t) = size // tp_size, divmod(rank, tp_size)
    tp_group = dp_group = dist.group.WORLD
    if 1 < tp_size < size:
        for d in range(replicas):
            group = dist.new_group(list(range(d * tp_size, (d + 1) * tp_size)))
            tp_group = group if d == replica else tp_group
        for i in range(tp_size):
            group = dist.new_group(list(range(i, size, tp_size)))
            dp_group = group if i == t else dp_group
    return Ranks(rank, TP(t, tp_size, tp_group), DP(replica, replicas, dp_group))


def _orphan_watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)  # the leader died without closing the pipe


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
