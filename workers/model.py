"""The served base model with its LoRA adapter slots.

One `LoraModel` per worker: the frozen base weights (bf16 on CUDA, fp32 on CPU), every
projection wrapped in a `MultiLoraLinear`, and a table of adapters by slot. Training
adapters and cached sampler adapters share the slots; the engine decides who lives where.

Entry points used by the rest of the worker:
  - `LoraModel.load(path, ...)` / `LoraModel.from_config(config, ...)` (tests)
  - `add_adapter(slot, spec, generator)`, `drop_adapter(slot)`, `adapter_weights(slot)`
  - `packed_pass(tokens, targets, slots, trains, row_loss)`: the training pass
  - `target_logprobs(tokens, targets, slots)`: per-row log p(target_t | tokens_≤t), [N_i]
  - `forward_logits(input_ids, attention_mask, position_ids, slots, past_key_values)`
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from workers.lora import LoraRouter, LoraWeights, MultiLoraLinear, init_lora_weights, target_names
from workers.lora import wrap_model as _wrap
from workers.parallel import tp
from workers.parallel.dp import DP
from workers.training import fastpath, packed

SUPPORTED_ARCHS = ("Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is: its rank, alpha and the projection groups it trains."""

    rank: int
    alpha: float
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        return target_names(self.train_attn, self.train_mlp, self.train_unembed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


@dataclass
class PassResult:
    logprobs: list[torch.Tensor]  # per row [N_i] fp32, detached
    losses: list[torch.Tensor]  # per row [N_i] fp32, detached
    grads: dict[int, list[torch.Tensor | None]]  # slot -> one per adapter_parameters(slot)


class LoraModel:
    def __init__(self, hf_model: nn.Module, device: torch.device):
        self.hf = hf_model.eval().requires_grad_(False)
        self.hf.set_attn_implementation(packed.ATTN_NAME)  # SDPA, or per-sequence when packed
        self.device = device
        self.config: PretrainedConfig = hf_model.config
        self.router: LoraRouter
        self.layers: dict[str, MultiLoraLinear]
        self.router, self.layers = _wrap(self.hf)
        self.adapters: dict[int, AdapterSpec] = {}
        params = inspect.signature(self.hf.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.fast = fastpath.supported(self.hf)  # packed passes through workers.training.fastpath
        self.share_prefixes = True  # fast packed passes run a prefix rows share once
        self.tp: tp.TP | None = None  # set by tp.apply_tp
        self.dp: DP | None = None  # this replica, under data parallelism (Executor.build)
        self.rank = 0  # the worker's rank this model lives in: rank 0 alone writes files

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: torch.device, dtype: torch.dtype,
             tp_group: tp.TP | None = None) -> LoraModel:
        """The model from a folder; with `tp_group`, this rank's shard: the model is built
        on the meta device, cut by the plan, and each tensor's part read from the
        safetensors files straight onto `device` (no rank loads the whole model)."""
        config = AutoConfig.from_pretrained(path)
        arch = (config.architectures or ["?"])[0]
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"architecture {arch!r} of {path} is not one of {SUPPORTED_ARCHS}")
        if tp_group is None or tp_group.size == 1:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                      attn_implementation="sdpa")
            return cls(hf.to(device), device)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                  attn_implementation="sdpa")
        model = cls(hf, device)
        if not model.fast:
            raise ValueError("tensor parallelism needs the fast path's layers (Qwen3, Qwen2, "
                             "Llama with SiLU and no sliding window)")
        tp.load_shards(model, path, tp.apply_tp(model, tp_group), device)
        return model

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
    ) -> LoraModel:
        """Random base weights from a config (tests and benchmarks)."""
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        return cls(hf.to(device), device)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def detokenizer(self, folder: Path) -> tuple[Callable[[list[int]], str], list[int]]:
        """The detokenizer of the model's folder (stop strings are matched on its text; ""
        when the folder has no tokenizer.json) and the model's EOS ids."""
        eos = self.config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            return (lambda ids: ""), eos_ids
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return (lambda ids: tok.decode(ids, skip_special_tokens=False)), eos_ids

    # --- adapters -------------------------------------------------------------------------
    def add_adapter(self, slot: int, spec: AdapterSpec, generator: torch.Generator) -> None:
        """Fresh adapter in `slot`: A random (from `generator`), B zero."""
        self.drop_adapter(slot)
        for name, layer in self.layers.items():
            if name.rsplit(".", 1)[-1] in spec.targets:
                layer.adapters[slot] = init_lora_weights(
                    layer, spec.rank, spec.scale, generator, self.device
                )
        self.adapters[slot] = spec

    def set_adapter_weights(
        self, slot: int, spec: AdapterSpec, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
        full: bool = True,
    ) -> None:
        """Install given (A, B) per layer name into `slot`: whole matrices (checkpoint
        loading; under tensor parallelism this rank keeps its part), or with `full` False
        this rank's parts as `adapter_weights` gave them (moving an adapter)."""
        self.drop_adapter(slot)
        for name, (A, B) in weights.items():
            if name not in self.layers:
                raise ValueError(f"checkpoint names layer {name!r}, which the model lacks")
            layer = self.layers[name]
            if full:
                A, B = tp.shard_factor(layer, "A", A), tp.shard_factor(layer, "B", B)
            layer.adapters[slot] = LoraWeights(
                A=_leaf(A, self.device), B=_leaf(B, self.device), scale=spec.scale)
        self.adapters[slot] = spec

    def full_adapter(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) per layer name as whole matrices, detached (under tensor parallelism a
        collective: every rank calls it)."""
        return {name: (tp.full_factor(self.layers[name], "A", w.A.detach()),
                       tp.full_factor(self.layers[name], "B", w.B.detach()))
                for name, w in self.adapter_weights(slot).items()}

    def adapter_layers(self, slot: int) -> list[MultiLoraLinear]:
        """The layer of each tensor of `adapter_parameters(slot)`, in the same order."""
        return [self.layers[n] for n in self.adapter_weights(slot) for _ in (0, 1)]

    def drop_adapter(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.adapters.pop(slot, None)
        self.adapters.pop(slot, None)

    def adapter_weights(self, slot: int) -> dict[str, LoraWeights]:
        """The adapter's weights by layer name, in a stable order."""
        return {
            name: layer.adapters[slot]
            for name, layer in self.layers.items()
            if slot in layer.adapters
        }

    def adapter_parameters(self, slot: int) -> list[torch.Tensor]:
        return [t for w in self.adapter_weights(slot).values() for t in (w.A, w.B)]

    # --- compute --------------------------------------------------------------------------
    def forward_logits(
        self,
        input_ids: torch.Tensor,  # [B, S]
        attention_mask: torch.Tensor,  # [B, S_total] (1 = real token)
        slots: list[int],  # [B] adapter slot per row (BASE_SLOT for none)
        position_ids: torch.Tensor | None = None,  # [B, S]
        past_key_values: object | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object | None]:
        """Raw logits [B, S, V] (model dtype) and the updated KV cache."""
        # transformers ≥5.2x renamed forward()'s `past_key_values` to `cache`; pass the one
        # this version's signature takes, and only when set.
        cache_kwargs: dict[str, object] = {"use_cache": use_cache}
        if past_key_values is not None:
            cache_kwargs[self._cache_kwarg] = past_key_values
        with self.router.route(slots, self.device):
            out = self.hf(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **cache_kwargs,
            )
        if not use_cache:
            return out.logits, None
        cache = getattr(out, "cache", None)
        return out.logits, out.past_key_values if cache is None else cache

    def packed_pass(
        self,
        tokens: list[list[int]],
        targets: list[list[int]],
        slots: list[int],
        trains: list[bool],
        row_loss: packed.RowLoss,
        chunk_tokens: int = 4096,
        checkpoint_layers: bool = False,
        prepare: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> PassResult:
        """One packed forward (and, for rows that train, backward) over the rows.

        Per row: log p(targets[i][t] | tokens[i][:t+1]) and `row_loss`'s per-token losses.
        For every slot with a training row: the gradient of the summed losses of its rows
        with respect to `adapter_parameters(slot)` (None where a tensor got none). No
        padding, chunked loss side (`packed.fused_head`); nothing is written to `.grad`.
        `prepare`, if given, first receives every row's log-probs (no gradient), for losses
        that need a whole row's before any token's (`row_loss` runs after it).
        """
        pack = packed.make_pack(tokens, targets, slots, self.device,
                                share=self.fast and self.share_prefixes)
        trains = [t and s in self.adapters for s, t in zip(slots, trains, strict=True)]
        train_slots = list(dict.fromkeys(s for s, t in zip(slots, trains, strict=True) if t))
        lm_head = self.layers["lm_head"]
        head_params = [t for s in train_slots if s in lm_head.adapters
                       for t in (lm_head.adapters[s].A, lm_head.adapters[s].B)]
        with torch.set_grad_enabled(bool(train_slots)):
            h = packed.hidden_states(self.hf, self.router, pack, checkpoint_layers, self.fast)
        if prepare is not None:
            prepare(packed.head_logprobs(lm_head, h.detach(), pack, chunk_tokens))
        head = packed.fused_head(lm_head, h, pack, chunk_tokens, row_loss, trains,
                                 head_params)
        grads = dict(head.head_grads)
        head_ids = {id(p) for p in head_params}
        body = [p for s in train_slots for p in self.adapter_parameters(s)
                if id(p) not in head_ids]
        if body and head.grad_h is not None and h.requires_grad:
            found = torch.autograd.grad(h, body, head.grad_h, allow_unused=True)
            grads.update({id(p): g for p, g in zip(body, found, strict=True) if g is not None})
        per_slot = {s: [grads.get(id(p)) for p in self.adapter_parameters(s)]
                     for s in train_slots}
        for s, found in per_slot.items():
            tp.reduce_grads(self.adapter_layers(s), found)
        return PassResult(head.logprobs, head.losses, per_slot)

    def warm_up(self, slot: int) -> None:
        """A small training pass and a forward-only pass on a scratch adapter in `slot`, so
        that compiled kernels are built at start-up rather than on a user's first call."""
        self.add_adapter(slot, AdapterSpec(rank=8, alpha=8.0), torch.Generator().manual_seed(0))
        try:
            rows = [list(range(1, 17)), list(range(3, 27))]
            for trains in (True, False):
                self.packed_pass(rows, rows, [slot, slot], [trains, trains],
                                 lambda row, offset, lp: -lp)
        finally:
            self.drop_adapter(slot)

    def target_logprobs(
        self, tokens: list[list[int]], targets: list[list[int]], slots: list[int]
    ) -> list[torch.Tensor]:
        """log p(targets[i][t] | tokens[i][:t+1]) per row, as fp32 tensors [N_i].

        Rows are right-padded into one batch. Differentiable with respect to the adapters
        when called with grad enabled.
        """
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        ids = torch.zeros(len(tokens), width, dtype=torch.long)
        tgt = torch.zeros(len(tokens), width, dtype=torch.long)
        mask = torch.zeros(len(tokens), width, dtype=torch.long)
        for i, (t, y) in enumerate(zip(tokens, targets, strict=True)):
            ids[i, : len(t)] = torch.tensor(t)
            tgt[i, : len(y)] = torch.tensor(y)
            mask[i, : len(t)] = 1
        ids, tgt, mask = ids.to(self.device), tgt.to(self.device), mask.to(self.device)
        logits, _ = self.forward_logits(ids, mask, slots)  # [B, S, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, S]
        return [picked[i, :n] for i, n in enumerate(lengths)]


def device_lost(device: torch.device) -> str | None:
    """Why `device` no longer runs anything (None: it does). A CUDA error such as an illegal
    address stays with the context: every later call on the device fails the same way."""
    if device.type != "cuda":
        return None
    try:
        torch.ones(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001 - any failure here means the context is gone
        return f"{type(e).__name__}: {e}"
    return None


def _leaf(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh fp32 leaf on `device`: never a view of the caller's tensor, which may be
    another model's weights or a slice of a whole matrix."""
    return t.detach().to(device, torch.float32, copy=True).contiguous().requires_grad_(True)
