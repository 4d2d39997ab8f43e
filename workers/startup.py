"""A worker rank's start: the base model found (the built-in default written on first use),
what a dead writer left cleared, the other ranks started (rank 0) or joined (a follower),
this rank's model loaded (its replica, or its shard under tensor parallelism) and its
kernels compiled, then the executor made."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from config import Settings, model_dir
from workers import checkpoints
from workers.model import LoraModel, pick_device, pick_dtype
from workers.parallel import dp, tp
from workers.sampling import choose
from workers.training import fastpath

log = logging.getLogger(__name__)


def build(cls: type, settings: Settings, rank: int = 0,
          join: Callable[[torch.device], Any] | None = None) -> Any:
    """`cls` (Executor) for rank `rank` of the worker (see Executor.build)."""
    from workers.default_model import ensure_default_model

    folder = model_dir(settings)
    if rank == 0 and settings.base_model == "tinkerq/tiny-qwen3":
        ensure_default_model(folder)
    if rank == 0:
        stale = checkpoints.remove_stale_temp(settings.checkpoint_root)
        stale += checkpoints.remove_stale_temp(settings.snapshot_root,
                                               patterns=checkpoints.SNAPSHOT_TEMP)
        if stale:
            log.warning("removed %d temporary folder(s) a dead writer left, e.g. %s",
                        len(stale), stale[0])
    if rank == 0:  # released runs of an earlier process: their records died with it
        shutil.rmtree(settings.released_dir, ignore_errors=True)
    device = pick_device(settings.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    leader, ranks = None, None
    if settings.world_size > 1:
        from workers.parallel.runtime import Leader

        if rank == 0:
            leader = Leader.start(settings, device, cls.build)
            ranks = leader.ranks
        else:
            ranks = join(device)  # type: ignore[misc]
    model = LoraModel.load(folder, device, pick_dtype(settings.dtype, device),
                           ranks.tp if ranks is not None and tp.active(ranks.tp) else None)
    model.rank = rank
    if ranks is not None and dp.active(ranks.dp):
        model.dp = ranks.dp
    decode, eos = model.detokenizer(folder)
    if device.type == "cuda" and model.fast and settings.compile_kernels:
        fastpath.compile_kernels()
        choose.compile_sampling()
        started = time.monotonic()
        model.warm_up(settings.max_lora_adapters + settings.max_sampler_adapters)
        log.info("training kernels compiled in %.1f s", time.monotonic() - started)
    log.info("loaded %s from %s on %s", settings.base_model, folder, device)
    executor = cls(model, settings, decode, eos)
    executor.leader = leader
    return executor
