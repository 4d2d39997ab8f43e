"""Which adapters sit in device slots: one LRU over training runs and sampler weights.

A worker keeps up to `max_models` training runs but only `max_lora_adapters` training slots
on the device, and `max_sampler_adapters` slots for the sampler weights that samples name.
Both kinds of occupant live in one LRU order and leave it the same way: when a kind's slots
are full, its least recently used occupant that the current work does not need makes room.
What leaving means differs by kind:

  training run    offloaded: its adapter weights, their accumulated `.grad` and its AdamW
                  moments move to CPU memory; when it is needed again its state comes back
                  into a free slot (maybe another number than it left: `Run.slot` follows).
                  The copies are fp32 to fp32, so a round trip is exact.
  sampler weights dropped: the folder on disk holds them, and the next sample that names
                  the folder loads it again. Samples already running keep the tensors they
                  were admitted with (a slot reloaded later gets new tensors).

A run that the engine releases (no call for release_idle_s) leaves memory altogether: its
weights, pending gradients and AdamW moments are written to one safetensors file per rank in
`released_dir`, and its next use reads them back into a slot, exactly as an offload would.

Memory is bounded: the offloaded runs' CPU copies may hold at most `budget_bytes`
(settings.max_offload_gib). A new run that, once some run is offloaded to make room for it,
could pass the budget is refused with a `user` error naming the figures; runs already kept
always keep running (bringing one back and sending another out moves about as much).

All slot logic lives here: the executor asks `take_slot` for a new run, `resident` for a run
it is about to use and `sampler_slot` for a sample's weights, and never touches slots or
CPU copies itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from protocol.jobs import UserError
from workers import checkpoints
from workers.lora import BASE_SLOT, LoraWeights
from workers.model import AdapterSpec, LoraModel
from workers.parallel import tp
from workers.training.optimizer import AdamState

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
Kind = Literal["train", "sampler"]


@dataclass
class Run:
    """A training run kept by this worker; `slot` is meaningful only while resident."""

    slot: int
    spec: AdapterSpec
    base_model: str
    adam: AdamState | None = None


class Residency:
    """The worker's training runs and loaded sampler weights, their device slots in one LRU
    order, and the offloaded training state."""

    def __init__(self, model: LoraModel, num_slots: int, max_models: int,
                 sampler_slots: int = 0, budget_bytes: int | None = None,
                 released_dir: Path | None = None):
        self.model = model
        self.released_dir = released_dir
        self.max_models = max_models
        self.budget_bytes = budget_bytes  # None: unbounded
        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, int] = {}  # loaded sampler folder -> its slot
        # training slots first, then the sampler slots
        self.free_slots: dict[Kind, list[int]] = {
            "train": list(range(num_slots)),
            "sampler": list(range(num_slots, num_slots + sampler_slots)),
        }
        # (kind, model id or folder) of every occupied slot, least recently used first
        self.lru: OrderedDict[tuple[Kind, str], None] = OrderedDict()
        self.offloaded: dict[str, dict[str, LoraWeights]] = {}  # CPU copies by model id
        self.released: dict[str, int | None] = {}  # on disk: model id -> AdamW step (or None)

    # --- training runs ------------------------------------------------------------------------
    def take_slot(self, spec: AdapterSpec) -> int:
        """A device slot for a run new to this worker (create, load) of adapter `spec`."""
        if len(self.runs) >= self.max_models:
            raise UserError(
                f"max_models={self.max_models} training runs are already kept in this "
                "worker; no room for another model"
            )
        if self.budget_bytes is not None and not self.free_slots["train"]:
            held, need = self.offloaded_bytes(), self.state_bytes(spec)
            # every rank reaches this check in the same barrier: refuse on all if any is over
            if tp.agree_min(int(held + need <= self.budget_bytes), self.model.tp) == 0:
                raise UserError(
                    f"this worker's memory for offloaded training runs is full: "
                    f"{len(self.offloaded)} runs hold {held / 2**30:.2f} GiB and another needs "
                    f"{need / 2**30:.3f} GiB, past max_offload_gib="
                    f"{self.budget_bytes / 2**30:.2f}; finish sessions you no longer use "
                    "(ServiceClient.close) or save a run and load it later"
                )
        return self._free_slot("train", keep=())

    def offloaded_bytes(self) -> int:
        """CPU memory the offloaded runs hold: weights, pending grads, AdamW moments."""
        total = 0
        for model_id, weights in self.offloaded.items():
            for w in weights.values():
                total += sum(t.nbytes + (t.grad.nbytes if t.grad is not None else 0)
                             for t in (w.A, w.B))
            adam = self.runs[model_id].adam
            if adam is not None:
                total += sum(t.nbytes for t in [*adam.exp_avg, *adam.exp_avg_sq])
        return total

    def state_bytes(self, spec: AdapterSpec) -> int:
        """What one run of `spec` holds once it has trained: 4 fp32 copies of its factors."""
        params = sum(spec.rank * (layer.in_features + layer.out_features)
                     for name, layer in self.model.layers.items()
                     if name.rsplit(".", 1)[-1] in spec.targets)
        return 4 * 4 * params

    def add(self, model_id: str, run: Run) -> None:
        """Record a run whose adapter was just installed in `run.slot`."""
        self.runs[model_id] = run
        self.lru["train", model_id] = None

    def drop(self, model_id: str) -> None:
        """Forget a run altogether, wherever its state is (a restore that failed part-way)."""
        run = self.runs.pop(model_id, None)
        if run is not None and self.in_slot(model_id):
            self._vacate(model_id, run)
        self.offloaded.pop(model_id, None)
        self.released.pop(model_id, None)

    def in_slot(self, model_id: str) -> bool:
        """Whether the run's adapter is on the device now (using it moves nothing)."""
        return ("train", model_id) in self.lru

    def resident(self, model_id: str, keep: Collection[str] = ()) -> Run:
        """The run with its adapter in a device slot, restored first if it was offloaded.

        Runs in `keep` (the rest of the current work) are never offloaded to make room.
        """
        run = self.runs.get(model_id)
        if run is None:
            raise UserError(f"model {model_id} is not known to this worker")
        if model_id in self.offloaded:
            self._restore(model_id, run, self._free_slot("train", {model_id, *keep}))
        elif model_id in self.released:
            self._reload(model_id, run, self._free_slot("train", {model_id, *keep}))
        self.lru.move_to_end(("train", model_id))
        return run

    def release(self, model_ids: Collection[str]) -> None:
        """Write each run's whole state to `released_dir` and free its memory (device slot
        or CPU copy); the next `resident` reads it back. Every rank writes its own shards. A
        run that cannot be written stays in memory, as it was."""
        written: dict[str, Path] = {}
        for model_id in model_ids:
            try:
                if (path := self._release(model_id)) is not None:
                    written[model_id] = path
            except Exception:  # noqa: BLE001 - a full disk must not stop the tick
                log.exception("could not release model %s; it stays in memory", model_id)
        if written:
            _give_memory_back()
        for model_id, path in written.items():  # logged once the memory is back
            log.info("released model %s: its state is in %s", model_id, path)

    def _release(self, model_id: str) -> Path | None:
        run = self.runs.get(model_id)
        if run is None or model_id in self.released or self.released_dir is None:
            return None
        weights = (self.model.adapter_weights(run.slot) if self.in_slot(model_id)
                   else self.offloaded[model_id])
        tensors: dict[str, torch.Tensor] = {}
        for name, w in weights.items():
            for part, t in (("A", w.A), ("B", w.B)):
                tensors[f"w.{name}.{part}"] = t
                if t.grad is not None:
                    tensors[f"w.{name}.{part}.grad"] = t.grad
        if run.adam is not None:
            for i, (m, v) in enumerate(zip(run.adam.exp_avg, run.adam.exp_avg_sq, strict=True)):
                tensors[f"adam.{i}.m"], tensors[f"adam.{i}.v"] = m, v
        path = self._released_file(model_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, partial)
        os.replace(partial, path)
        if self.in_slot(model_id):
            self._vacate(model_id, run)
        else:
            del self.offloaded[model_id]
        self.released[model_id] = None if run.adam is None else run.adam.step
        run.adam = None
        return path

    def _released_file(self, model_id: str) -> Path:
        return self.released_dir / f"{model_id}.rank{self.model.rank}.safetensors"

    # --- sampler weights ----------------------------------------------------------------------
    def sampler_slot(self, folder: str | None) -> int:
        """The slot holding the sampler weights saved in `folder` (loaded first if they are
        not), or BASE_SLOT for None: a sample of the base model."""
        if folder is None:
            return BASE_SLOT
        if folder in self.samplers:
            self.lru.move_to_end(("sampler", folder))
            return self.samplers[folder]
        slot = self._free_slot("sampler", keep=())
        try:
            spec, weights = checkpoints.load_sampler_weights(Path(folder))
            self.model.set_adapter_weights(slot, spec, weights)
        except BaseException:
            self.model.drop_adapter(slot)
            self.free_slots["sampler"].insert(0, slot)
            raise
        self.samplers[folder] = slot
        self.lru["sampler", folder] = None
        return slot

    def forget_sampler(self, folder: str) -> None:
        """Drop the weights loaded from `folder` (it was written again: the next sample loads
        the new ones)."""
        if folder in self.samplers:
            self._drop_sampler(folder)

    # --- one LRU ------------------------------------------------------------------------------
    def _free_slot(self, kind: Kind, keep: Collection[str]) -> int:
        free = self.free_slots[kind]
        if not free:
            victim = next((key for k, key in self.lru if k == kind and key not in keep), None)
            if victim is None:  # a bug: callers keep fewer runs than there are slots
                raise RuntimeError(f"all {kind} adapter slots are needed at once")
            if kind == "train":
                self._offload(victim)
            else:
                self._drop_sampler(victim)
        return free.pop(0)

    def _drop_sampler(self, folder: str) -> None:
        slot = self.samplers.pop(folder)
        self.model.drop_adapter(slot)
        self.free_slots["sampler"].append(slot)
        del self.lru["sampler", folder]

    def _offload(self, model_id: str) -> None:
        run = self.runs[model_id]
        weights = self.model.adapter_weights(run.slot)
        self.offloaded[model_id] = {name: _moved(w, CPU) for name, w in weights.items()}
        _move_adam(run.adam, CPU)
        self._vacate(model_id, run)
        log.info("offloaded model %s from slot %d to CPU memory", model_id, run.slot)

    def _vacate(self, model_id: str, run: Run) -> None:
        """Free the run's device slot (its state is elsewhere now)."""
        self.model.drop_adapter(run.slot)
        self.free_slots["train"].append(run.slot)
        del self.lru["train", model_id]

    def _install(self, model_id: str, run: Run, slot: int, factors: dict[str, tuple]) -> None:
        """Put the run's (A, B, A.grad, B.grad) per layer into `slot`: set_adapter_weights
        makes fresh leaves on the device, and the pending grads (None: none) follow them."""
        self.model.set_adapter_weights(
            slot, run.spec, {name: (A, B) for name, (A, B, _, _) in factors.items()}, full=False)
        for name, w in self.model.adapter_weights(slot).items():
            _, _, grad_a, grad_b = factors[name]
            w.A.grad = None if grad_a is None else grad_a.to(w.A.device)
            w.B.grad = None if grad_b is None else grad_b.to(w.B.device)
        run.slot = slot
        self.lru["train", model_id] = None

    def _restore(self, model_id: str, run: Run, slot: int) -> None:
        saved = self.offloaded.pop(model_id)
        self._install(model_id, run, slot, {
            name: (w.A.detach(), w.B.detach(), w.A.grad, w.B.grad) for name, w in saved.items()})
        _move_adam(run.adam, self.model.device)
        log.info("restored model %s from CPU memory into slot %d", model_id, slot)

    def _reload(self, model_id: str, run: Run, slot: int) -> None:
        path = self._released_file(model_id)
        tensors = load_file(path, device=str(self.model.device))
        names = [k[2:-2] for k in tensors if k.startswith("w.") and k.endswith(".A")]
        self._install(model_id, run, slot, {
            n: tuple(tensors.get(f"w.{n}.{part}") for part in ("A", "B", "A.grad", "B.grad"))
            for n in names})
        step = self.released.pop(model_id)
        if step is not None:
            count = sum(k.startswith("adam.") for k in tensors) // 2
            run.adam = AdamState(step, [tensors[f"adam.{i}.m"] for i in range(count)],
                                 [tensors[f"adam.{i}.v"] for i in range(count)])
        path.unlink()
        log.info("reloaded released model %s into slot %d", model_id, slot)


def _give_memory_back() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise), so that memory
    released by idle runs shows in the worker's RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
