"""Which training runs have their adapter in a device slot; the others wait in CPU memory.

A worker keeps up to `max_models` training runs but only `max_lora_adapters` adapter slots
on the device. When a run that is not resident is needed, the least recently used resident
run that the current work does not need is offloaded: its adapter weights, their
accumulated `.grad` and its AdamW moments move to CPU memory and its slot is freed; the
needed run's state comes back into a free slot (maybe another number than it left: `Run.slot`
follows). The copies are fp32 to fp32, so a round trip is exact.

All offload logic lives here; the executor asks `take_slot` for a new run and `resident`
for a run it is about to use, and never touches slots or CPU copies itself.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

import torch

from protocol.jobs import UserError
from workers.lora import LoraWeights
from workers.model import AdapterSpec, LoraModel
from workers.training.optimizer import AdamState

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


@dataclass
class Run:
    """A training run kept by this worker; `slot` is meaningful only while resident."""

    slot: int
    spec: AdapterSpec
    base_model: str
    adam: AdamState | None = None


class Residency:
    """The worker's training runs, their device slots in LRU order, and the offloaded state."""

    def __init__(self, model: LoraModel, num_slots: int, max_models: int):
        self.model = model
        self.max_models = max_models
        self.runs: dict[str, Run] = {}
        self.free_slots = list(range(num_slots))
        self.lru: OrderedDict[str, None] = OrderedDict()  # resident model ids, oldest first
        self.offloaded: dict[str, dict[str, LoraWeights]] = {}  # CPU copies by model id

    def take_slot(self) -> int:
        """A device slot for a run new to this worker (create, load)."""
        if len(self.runs) >= self.max_models:
            raise UserError(
                f"max_models={self.max_models} training runs are already kept in this "
                "worker; no room for another model"
            )
        return self._free_slot(keep=())

    def add(self, model_id: str, run: Run) -> None:
        """Record a run whose adapter was just installed in `run.slot`."""
        self.runs[model_id] = run
        self.lru[model_id] = None

    def resident(self, model_id: str, keep: Collection[str] = ()) -> Run:
        """The run with its adapter in a device slot, restored first if it was offloaded.

        Runs in `keep` (the rest of the current work) are never offloaded to make room.
        """
        run = self.runs.get(model_id)
        if run is None:
            raise UserError(f"model {model_id} is not known to this worker")
        if model_id in self.offloaded:
            self._restore(model_id, run, self._free_slot({model_id, *keep}))
        self.lru.move_to_end(model_id)
        return run

    def _free_slot(self, keep: Collection[str]) -> int:
        if not self.free_slots:
            victim = next((m for m in self.lru if m not in keep), None)
            if victim is None:  # a bug: callers keep fewer runs than there are slots
                raise RuntimeError(f"all {len(self.lru)} adapter slots are needed at once")
            self._offload(victim)
        return self.free_slots.pop(0)

    def _offload(self, model_id: str) -> None:
        run = self.runs[model_id]
        weights = self.model.adapter_weights(run.slot)
        self.offloaded[model_id] = {name: _moved(w, CPU) for name, w in weights.items()}
        _move_adam(run.adam, CPU)
        self.model.drop_adapter(run.slot)
        self.free_slots.append(run.slot)
        del self.lru[model_id]
        log.info("offloaded model %s from slot %d to CPU memory", model_id, run.slot)

    def _restore(self, model_id: str, run: Run, slot: int) -> None:
        saved = self.offloaded.pop(model_id)
        # set_adapter_weights makes fresh leaves on the device; the grads follow them.
        self.model.set_adapter_weights(
            slot, run.spec, {name: (w.A.detach(), w.B.detach()) for name, w in saved.items()},
            full=False,
        )
        for name, w in self.model.adapter_weights(slot).items():
            w.A.grad = _grad_to(saved[name].A, w.A.device)
            w.B.grad = _grad_to(saved[name].B, w.B.device)
        _move_adam(run.adam, self.model.device)
        run.slot = slot
        self.lru[model_id] = None
        log.info("restored model %s from CPU memory into slot %d", model_id, slot)


def _moved(w: LoraWeights, device: torch.device) -> LoraWeights:
    """The same adapter weights on `device`: leaves that require grad, grads carried along."""
    A = w.A.detach().to(device).requires_grad_(True)
    B = w.B.detach().to(device).requires_grad_(True)
    A.grad, B.grad = _grad_to(w.A, device), _grad_to(w.B, device)
    return LoraWeights(A=A, B=B, scale=w.scale)


def _grad_to(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    return None if t.grad is None else t.grad.to(device)


def _move_adam(adam: AdamState | None, device: torch.device) -> None:
    if adam is not None:
        adam.exp_avg = [m.to(device) for m in adam.exp_avg]
        adam.exp_avg_sq = [v.to(device) for v in adam.exp_avg_sq]
