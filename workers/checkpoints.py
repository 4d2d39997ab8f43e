"""Adapter checkpoints on disk: training state and sampler weights, written atomically.

Sampler weights folder (what `peft.PeftModel.from_pretrained(base, folder)` loads):
    adapter_config.json         peft LoraConfig (r, lora_alpha, short target_modules names)
    adapter_model.safetensors   base_model.model.<layer>.lora_A.weight [r, in]
                                base_model.model.<layer>.lora_B.weight [out, r]
Training state folder: the same two files, plus
    optimizer.safetensors       AdamState.to_tensors(), moments in adapter_parameters order
    tinkerq_state.json          {"rank", "alpha", "train_attn", "train_mlp", "train_unembed",
                                 "base_model", "has_optimizer"}

With tied embeddings, an lm_head adapter only changes the unembedding: peft wraps lm_head
alone and leaves embed_tokens as it is, as MultiLoraLinear does, so no embedding is saved.

Every folder is written into a temporary sibling and renamed into place, so a reader sees
the old folder or the new one, never half of one. The sibling's name says who wrote it
(`.<name>.tmp-<host>-<pid>-<random>`, `.old-` for a replaced folder on its way out), so
that a worker starting up removes what a dead writer on its host left
(`remove_stale_temp`), and anyone's after a day.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from protocol.jobs import UserError
from store import encryption
from workers import tensorfile
from workers.lora import ATTN_PROJS, MLP_PROJS, UNEMBED
from workers.model import AdapterSpec, LoraModel
from workers.parallel import tp
from workers.training.optimizer import AdamState

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "tinkerq_state.json"
PEFT_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before module names
EXPORT_UNEMBED = "model.unembed_tokens"  # the unembedding's name in Tinker's exports

LayerWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A, B)


# --- sampler weights (peft format) ---------------------------------------------------------
def save_sampler_weights(model: LoraModel, slot: int, path: Path, base_model: str, *,
                         export: bool = False, encrypt_to: list[str] | None = None) -> int:
    """Write the adapter in `slot` as a peft LoRA folder; returns the bytes written.

    `export` (save_weights_external): the unembedding's adapter goes under Tinker's export
    name, `model.unembed_tokens`, which tinker_cookbook's merge and conversion tools map to
    `lm_head`, or to the embedding of a model with tied embeddings (peft's `lm_head` name
    has no tensor to land on there). `encrypt_to`: age recipients each file is encrypted to.
    """
    spec = _spec_of(model, slot)
    tensors = _peft_tensors(model, slot)
    if not _writes(model):
        return 0
    if export:
        head = f"{PEFT_PREFIX}{UNEMBED[0]}."
        tensors = {k.replace(head, f"{PEFT_PREFIX}{EXPORT_UNEMBED}.", 1): v
                   for k, v in tensors.items()}

    def write(folder: Path) -> None:
        _write_peft(folder, tensors, spec, base_model)
        if encrypt_to:
            encryption.encrypt_folder(folder, encrypt_to)

    return _write_atomic(Path(path), write)


def load_sampler_weights(path: Path) -> tuple[AdapterSpec, LayerWeights]:
    """Read a peft LoRA folder (ours, or one peft wrote for a supported model)."""
    path = _require_files(Path(path), (CONFIG_FILE, WEIGHTS_FILE))
    config = _read_json(path / CONFIG_FILE)
    weights = _read_peft_weights(path / WEIGHTS_FILE)
    short = {name.rsplit(".", 1)[-1] for name in weights}
    spec = AdapterSpec(
        rank=_peft_rank(config, path),
        alpha=float(config.get("lora_alpha", 8)),
        train_attn=bool(short & set(ATTN_PROJS)),
        train_mlp=bool(short & set(MLP_PROJS)),
        train_unembed=bool(short & set(UNEMBED)),
    )
    return spec, weights


# --- training state ------------------------------------------------------------------------
@dataclass
class TrainingState:
    """A run's whole training state, on the CPU ready to write (or on its device, for the
    snapshot writer to bring over): the adapter under peft's names, its spec, its AdamW
    state (None before its first step) and its base model."""

    tensors: dict[str, torch.Tensor]
    spec: AdapterSpec
    optimizer: AdamState | None
    base_model: str
    # on the device: one fp32 buffer that every tensor above is a view of, in `ordered()`
    # order: one copy brings it all to the host
    flat: torch.Tensor | None = None

    def ordered(self) -> list[torch.Tensor]:
        """The weights, then the first moments, then the second."""
        moments = [] if self.optimizer is None else [*self.optimizer.exp_avg,
                                                      *self.optimizer.exp_avg_sq]
        return [*self.tensors.values(), *moments]

    def over(self, flat: torch.Tensor) -> TrainingState:
        """The same layout as views of `flat` (fp32, as many elements as the state)."""
        ordered = self.ordered()
        views = [part.view(t.shape) for part, t in zip(
            flat.split([t.numel() for t in ordered]), ordered, strict=True)]
        n = len(self.tensors)
        tensors = dict(zip(self.tensors, views[:n], strict=True))
        optimizer = self.optimizer
        if optimizer is not None:
            k = len(optimizer.exp_avg)
            optimizer = AdamState(optimizer.step, views[n:n + k], views[n + k:])
        return TrainingState(tensors, self.spec, optimizer, self.base_model, flat)


def gather_training_state(model: LoraModel, slot: int, optimizer: AdamState | None,
                          base_model: str, *, on_device: bool = False) -> TrainingState | None:
    """The adapter in `slot` and `optimizer` as whole tensors (a collective under tensor
    parallelism: every rank calls it; None on the ranks that do not write): on the CPU, or
    with `on_device` as copies of their own on the model's device (a snapshot: one fast
    device copy in the tick, brought to the host later by the snapshot writer, while
    training goes on)."""
    spec = _spec_of(model, slot)
    tensors = _peft_tensors(model, slot, host=not on_device)
    if optimizer is not None and tp.active(model.tp):  # whole moments, like the weights
        layers = model.adapter_layers(slot)
        optimizer = AdamState(optimizer.step, tp.full_tensors(layers, optimizer.exp_avg),
                              tp.full_tensors(layers, optimizer.exp_avg_sq))
    if not _writes(model):
        return None
    state = TrainingState(tensors, spec, optimizer, base_model)
    if not on_device:
        return state
    # a run's state is some thousand small tensors: copied one launch each, they would cost
    # the tick milliseconds; packed into one buffer, it is one batched copy
    sources = state.ordered()
    packed = state.over(torch.empty(sum(t.numel() for t in sources), dtype=torch.float32,
                                    device=sources[0].device))
    torch._foreach_copy_(packed.ordered(), [t.detach() for t in sources])
    return packed


def write_training_state(path: Path, state: TrainingState, direct: bool = False) -> int:
    """Write a gathered state as a training checkpoint folder; returns the bytes written.
    `direct`: its tensors' bytes go out with O_DIRECT where they can (tensorfile.save)."""
    spec, optimizer = state.spec, state.optimizer

    def write(folder: Path) -> None:
        _write_peft(folder, state.tensors, spec, state.base_model, direct)
        if optimizer is not None:
            tensorfile.save(optimizer.to_tensors(), folder / OPTIMIZER_FILE, direct=direct)
        meta = {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "train_attn": spec.train_attn,
            "train_mlp": spec.train_mlp,
            "train_unembed": spec.train_unembed,
            "base_model": state.base_model,
            "has_optimizer": optimizer is not None,
        }
        (folder / STATE_FILE).write_text(json.dumps(meta, indent=2))

    return _write_atomic(Path(path), write)


def save_training_state(
    model: LoraModel, slot: int, optimizer: AdamState | None, path: Path, base_model: str
) -> int:
    """Write weights, optimizer moments and the adapter's spec; returns the bytes written."""
    state = gather_training_state(model, slot, optimizer, base_model)
    return 0 if state is None else write_training_state(path, state)


def load_training_state(path: Path) -> tuple[AdapterSpec, LayerWeights, AdamState | None]:
    """Inverse of `save_training_state`; the AdamState's tensors are on the CPU."""
    path = _require_files(Path(path), (STATE_FILE, WEIGHTS_FILE))
    state = _read_json(path / STATE_FILE)
    try:
        spec = AdapterSpec(
            rank=int(state["rank"]),
            alpha=float(state["alpha"]),
            train_attn=bool(state["train_attn"]),
            train_mlp=bool(state["train_mlp"]),
            train_unembed=bool(state["train_unembed"]),
        )
    except KeyError as e:
        raise UserError(f"{path / STATE_FILE} lacks the key {e}") from e
    weights = _read_peft_weights(path / WEIGHTS_FILE)
    optimizer = None
    if state.get("has_optimizer"):
        _require_files(path, (OPTIMIZER_FILE,))
        optimizer = AdamState.from_tensors(load_file(str(path / OPTIMIZER_FILE)))
    return spec, weights, optimizer


# --- helpers -------------------------------------------------------------------------------
def _spec_of(model: LoraModel, slot: int) -> AdapterSpec:
    spec = model.adapters.get(slot)
    if spec is None:
        raise UserError(f"slot {slot} holds no adapter; occupied slots: {sorted(model.adapters)}")
    return spec


def _peft_tensors(model: LoraModel, slot: int, host: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's whole A and B under peft's names (a collective under tensor
    parallelism: every rank calls it, rank 0 writes), on the CPU or, with `host` off, as
    they are on the model's device (the caller copies them)."""
    tensors = {}
    for name, (A, B) in model.full_adapter(slot).items():
        for part, t in (("A", A), ("B", B)):
            tensors[f"{PEFT_PREFIX}{name}.lora_{part}.weight"] = (
                t.float().cpu().contiguous() if host else t)
    return tensors


def _writes(model: LoraModel) -> bool:
    return model.rank == 0


def _write_peft(folder: Path, tensors: dict[str, torch.Tensor], spec: AdapterSpec,
                base_model: str, direct: bool = False) -> None:
    tensorfile.save(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"}, direct=direct)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": list(spec.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _read_peft_weights(file: Path) -> LayerWeights:
    """peft keys -> {layer name: (A [r, in], B [out, r])}; anything else is an error."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(file)).items():
        # peft omits the adapter name ("default") from saved keys.
        inner = key.removeprefix(PEFT_PREFIX)
        layer, _, part = inner.rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise UserError(f"{file} has tensor {key!r}, which is not a LoRA A/B weight")
        pairs.setdefault(layer, {})[part[0]] = tensor.float()
    incomplete = [name for name, p in pairs.items() if len(p) != 2]
    if incomplete:
        raise UserError(f"{file} lacks lora_A or lora_B for layers {incomplete[:3]}")
    return {name: (p["A"], p["B"]) for name, p in pairs.items()}


def _peft_rank(config: dict, path: Path) -> int:
    # One rank and one scale per adapter: per-layer patterns or rsLoRA would change scale.
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise UserError(f"{path} uses rank_pattern/alpha_pattern/use_rslora; not supported")
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise UserError(f"{path / CONFIG_FILE} is not a LoRA config (peft_type, r)")
    return int(config["r"])


def _write_atomic(path: Path, write: Callable[[Path], None]) -> int:
    """Run `write(tmp)` on a fresh sibling folder, then swap it in for `path`."""
    if path.name in ("", ".", "..") or path.name.startswith("."):  # the API refuses these
        raise UserError(f"checkpoint folder {str(path)!r} does not name a checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name, "tmp"), dir=path.parent))
    try:
        write(tmp)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


def _replace_dir(src: Path, dst: Path) -> None:
    # rename() cannot replace a non-empty folder: move the old one aside first.
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst.name, "old"), dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _require_files(path: Path, names: tuple[str, ...]) -> Path:
    if not path.is_dir():
        raise UserError(f"checkpoint folder {path} does not exist")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise UserError(f"checkpoint folder {path} lacks {missing}")
    return path


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON: {e}") from e


def written(model_id: str, kind: str, body: dict[str, Any], size: int) -> dict[str, Any]:
    """What the task records of a checkpoint a job wrote (`Outcome.checkpoint`): `body` is
    the save job's payload, `size` the bytes written."""
    folder = Path(body["checkpoint_dir"])
    return {
        "model_id": model_id,
        "kind": kind,
        "name": folder.name,
        "tinker_path": body["tinker_path"],
        "local_dir": str(folder),
        "size_bytes": size,
        "ttl_seconds": body.get("ttl_seconds"),
        "user_metadata": body.get("user_metadata"),
    }


STALE_AFTER_S = 24 * 3600  # a temporary folder of another host's writer this old is dead


def _temp_prefix(name: str, tag: str) -> str:
    return f".{name}.{tag}-{socket.gethostname()}-{os.getpid()}-"


CHECKPOINT_TEMP = ("*/*/*/.*.tmp-*", "*/*/*/.*.old-*", "*/*/*/_session/.*.tmp-*",
                   "*/*/*/_session/.*.old-*")
SNAPSHOT_TEMP = ("*/.*.tmp-*", "*/.*.old-*")  # <snapshot root>/<model id>/.<seq>.tmp-...


def remove_stale_temp(root: Path, now: float | None = None,
                      patterns: tuple[str, ...] = CHECKPOINT_TEMP) -> list[Path]:
    """Delete the temporary folders under `root` (the checkpoint root, or the snapshots'
    with SNAPSHOT_TEMP) that no live writer holds: this host's whose process is gone, and
    anyone's older than STALE_AFTER_S. Returns them."""
    now = time.time() if now is None else now
    host, removed = socket.gethostname(), []
    for pattern in patterns:
        for path in Path(root).glob(pattern):
            writer = _writer(path.name)
            mine_and_dead = writer is not None and writer[0] == host and not _alive(writer[1])
            if mine_and_dead or now - path.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _writer(folder_name: str) -> tuple[str, int] | None:
    """(host, pid) from `.<name>.tmp-<host>-<pid>-<random>`, or None for another shape."""
    tag = ".tmp-" if ".tmp-" in folder_name else ".old-"
    head, _, rest = folder_name.rpartition(tag)
    parts = rest.rsplit("-", 2)  # host (may hold '-'), pid, mkdtemp's random tail (never '-')
    if not head or len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
