"""Which worker serves what (store/workers.py holds the registry): the base models a client
may name, the queue a new training run or sampling session goes to, and the config of a
base model that this process does not serve itself.

A base model is served while some worker of it is live (beat within failover_after_s).
Before any worker has beaten (a fresh start: the worker still loads its model), the base
model of this process's own settings stands in, on its own queue.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from protocol.errors import RequestError
from store import workers
from store.model_info import ModelInfo
from tasks.submit import Submitter

_INFOS: dict[str, ModelInfo] = {}  # a registered model folder -> what it says


def _live(sub: Submitter) -> dt.timedelta:
    return dt.timedelta(seconds=sub.settings.failover_after_s)


def served(sub: Submitter) -> list[str]:
    """The base model names (and aliases) a client may use now."""
    with sub.store.transaction() as s:
        rows = workers.live(s, _live(sub))
    names = [n for row in rows for n in workers.names_of(row)]
    return list(dict.fromkeys(names or sub.settings.served_model_names()))


def readiness(sub: Submitter) -> dict[str, bool]:
    """Whether each base model this deployment serves has a live worker: the API's own and
    every one a worker registered (a worker's row is forgotten a day after its last beat)."""
    with sub.store.transaction() as s:
        known = workers.registered(s)
        alive = workers.live(s, _live(sub))
    live_models = {row.base_model for row in alive}
    models = dict.fromkeys([sub.settings.base_model, *(row.base_model for row in known)])
    return {name: name in live_models for name in models}


def queue_for(sub: Submitter, base_model: str, training: bool) -> str:
    """The queue of the live worker of `base_model` that takes a new training run (the
    fewest runs) or sampling session (the fewest unanswered samples)."""
    pick = workers.pick_trainer if training else workers.pick_sampler
    with sub.store.transaction() as s:
        row = pick(s, base_model, _live(sub))
    if row is not None:
        return row.queue
    if base_model in sub.settings.served_model_names():
        return sub.settings.queue  # this process's own model: its worker may be starting
    raise RequestError(400, f"base_model {base_model!r} is not served here; served models: "
                            f"{served(sub)}")


def model_info(sub: Submitter, base_model: str) -> ModelInfo:
    """What the API knows of `base_model` (vocabulary, context, tokenizer)."""
    if not base_model or base_model in sub.settings.served_model_names():
        return sub.model
    with sub.store.transaction() as s:
        path = workers.model_path(s, base_model)
    if not path:
        raise RequestError(503, f"no worker of base model {base_model!r} has registered its "
                                "folder yet; is it up?")
    if path not in _INFOS:
        _INFOS[path] = ModelInfo(sub.settings, Path(path))
    return _INFOS[path]
