"""Projection groups and the LoRA table of the running batch.

Projections that read the same input run as one matmul: q/k/v and gate/up per layer
(`fuse_base_weights` lays their base weights side by side once; the Linears keep views).
LoRA in a step: every adapter in the batch has a column range of R columns; per projection
group, A stacks the members' [R, in] blocks and scale·B is block-diagonal [Σ out, n·R]; a
per-row 0/1 mask keeps each row to its own adapter's columns:
y = base(x) + ((x Aᵀ) ⊙ mask) Bᵀ. A fixed number of dense matmuls whatever the mix of
adapters (no mask when every row uses the only adapter), and nothing that depends on the
batch's order. The fused step can instead add (x Aᵀ) Bᵀ inside its kernels, each row over
its own adapter's column range (`DecodeInputs.cols`): no mask, and no other adapter's B
read; the running batch orders its rows by adapter so that blocks of rows span few.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from workers.lora import LoraWeights
from workers.model import LoraModel

Adapter = dict[str, LoraWeights]  # layer name -> weights, as LoraModel.adapter_weights gives


def projection_groups(model: LoraModel) -> dict[str, list[str]]:
    """Projections that read the same input, run as one matmul in a decode step: per layer
    q/k/v and gate/up (plus o, down alone), and the LM head. Their base weights are laid
    side by side once (`fuse_base_weights`)."""
    groups: dict[str, list[str]] = {}
    for p in _layer_names(model):
        groups[p + "qkv"] = [p + f"self_attn.{x}_proj" for x in "qkv"]
        groups[p + "o"] = [p + "self_attn.o_proj"]
        groups[p + "gate_up"] = [p + "mlp.gate_proj", p + "mlp.up_proj"]
        groups[p + "down"] = [p + "mlp.down_proj"]
    groups["lm_head"] = ["lm_head"]
    return groups


def fuse_base_weights(model: LoraModel) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """One [Σ out, in] weight (and bias) per projection group. The member Linears' weights
    become views into it, so no memory is added and training reads the same numbers."""
    fused = getattr(model, "_fused_groups", None)
    if fused is not None:
        return fused
    fused = {}
    with torch.no_grad():
        for group, names in projection_groups(model).items():
            bases = [model.layers[n].base for n in names]
            if len(bases) == 1:
                fused[group] = (bases[0].weight, bases[0].bias)
                continue
            weight = torch.cat([b.weight for b in bases])
            has_bias = [b.bias is not None for b in bases]
            bias = torch.cat([b.bias for b in bases]) if all(has_bias) else None
            _point(bases, weight, bias)
            if any(has_bias) and bias is None:  # mixed biases: keep the group's own zeros
                bias = torch.cat([b.bias if b.bias is not None else
                                  torch.zeros_like(b.weight[:, 0]) for b in bases])
            fused[group] = (weight, bias)
    model._fused_groups = fused  # type: ignore[attr-defined]
    return fused


def _point(bases: list[torch.nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make the Linears' weights (and biases) consecutive row views of `weight` (`bias`)."""
    row = 0
    for b in bases:
        n = b.weight.shape[0]
        b.weight.data = weight[row : row + n]
        if bias is not None:
            b.bias.data = bias[row : row + n]
        row += n


def _extend(model: LoraModel, group: str, names: list[str], extra: int
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move a group's base weight into a buffer with `extra` more rows after it (for the
    LoRA table's A, so one matmul gives the base output and x Aᵀ); the Linears follow."""
    weight, bias = model._fused_groups[group]  # type: ignore[attr-defined]
    out = weight.shape[0]
    # (a sampling step runs under inference_mode; these weights must stay usable by training)
    with torch.inference_mode(False), torch.no_grad():
        wide = torch.zeros(out + extra, weight.shape[1], dtype=weight.dtype,
                           device=weight.device)
        wide[:out] = weight
        _point([model.layers[n].base for n in names], wide, None)
        model._fused_groups[group] = (wide[:out], bias)  # type: ignore[attr-defined]
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(extra)])
    return wide, bias


class LoraTable:
    """The batch's adapters side by side, per projection group: A [n·R, in] (the members'
    A stacked, R columns each; stored as the last rows of the group's widened base weight)
    and a block-diagonal scale·B [Σ out, n·R]."""

    def __init__(self, model: LoraModel):
        self.model = model
        # adapter_key -> (weights, first column, end column)
        self.adapters: OrderedDict[tuple[int, ...], tuple[Adapter, int, int]] = OrderedDict()
        self.width = 0
        self.prefixes = _layer_names(model)  # "model.layers.{i}." per decoder layer
        self.groups = projection_groups(model)
        self.styles = {g: getattr(model.layers[names[0]], "tp_style", None)
                       for g, names in self.groups.items()}  # tensor-parallel layout
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.wide: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # [base; A]

    def columns(self, key: tuple[int, ...] | None) -> tuple[int, int]:
        """The column range of the adapter with this adapter_key (None: no columns)."""
        if key is None:
            return 0, 0
        _, lo, hi = self.adapters[key]
        return lo, hi

    def rebuild(self, adapters: list[Adapter]) -> bool:
        """Lay out exactly these adapters. Buffers are reused when the width is unchanged
        (captured graphs stay valid); True when they were reallocated."""
        ranks = [max(w.A.shape[0] for w in a.values()) if a else 0 for a in adapters]
        width = -(-sum(ranks) // 8) * 8
        dtype = next(self.model.hf.parameters()).dtype
        layers, device = self.model.layers, self.model.device
        reallocated = width != self.width
        if reallocated:
            self.A, self.B, self.wide = {}, {}, {}
            if width:
                for group, names in self.groups.items():
                    n = len(names)
                    out = sum(layers[m].out_features for m in names)
                    self.wide[group] = _extend(self.model, group, names, n * width)
                    self.A[group] = self.wide[group][0][out:]
                    self.B[group] = torch.zeros(out, n * width, dtype=dtype, device=device)
            self.width = width
        else:
            for t in (*self.A.values(), *self.B.values()):
                t.zero_()
        self.adapters.clear()
        lo = 0
        for adapter, rank in zip(adapters, ranks, strict=True):
            self.adapters[adapter_key(adapter)] = (adapter, lo, lo + rank)
            with torch.no_grad():
                for group, names in self.groups.items():
                    row = 0
                    for m, name in enumerate(names):
                        out = layers[name].out_features
                        w = adapter.get(name)
                        if w is not None:
                            r, c = w.A.shape[0], m * width + lo
                            self.A[group][c : c + r] = w.A.to(dtype)
                            self.B[group][row : row + out, c : c + r] = (w.B * w.scale).to(dtype)
                        row += out
            lo += rank
        return reallocated

    def uniform(self, keys: list[tuple[int, ...] | None]) -> bool:
        """Every row on the table's only adapter: its LoRA needs no row mask."""
        return (len(self.adapters) == 1 and keys[0] in self.adapters
                and len(set(keys)) == 1)

    def row_columns(self, keys: list[tuple[int, ...] | None],
                    repeats: list[int] | None = None) -> torch.Tensor:
        """Each row's LoRA columns [lo, hi) in the table, [rows, 2] int32 (lo = hi: none);
        with `repeats`, key i stands for repeats[i] rows."""
        device = self.model.device
        cols = torch.tensor([self.columns(k) for k in keys], dtype=torch.int32,
                            device=device)
        if repeats is None:
            return cols
        return cols.repeat_interleave(torch.tensor(repeats, device=device), dim=0)

    def row_mask(self, keys: list[tuple[int, ...] | None], repeats: list[int] | None = None,
                 cols: torch.Tensor | None = None) -> torch.Tensor | None:
        """The rows' 0/1 masks over the table's columns [rows, R] (None: no LoRA, or every
        row on the one adapter); from `cols` when the caller has them."""
        if not self.width or self.uniform(keys):
            return None
        if cols is None:
            cols = self.row_columns(keys, repeats)
        col = torch.arange(self.width, device=cols.device)
        dtype = next(self.model.hf.parameters()).dtype
        return ((col[None] >= cols[:, :1]) & (col[None] < cols[:, 1:])).to(dtype)


def adapter_key(adapter: Adapter) -> tuple[int, ...]:
    """Identity of an adapter's weight tensors: requests of one sampler slot share a column
    range; a slot reloaded with new weights gets a new one."""
    return tuple(id(w.A) for w in adapter.values())


def _layer_names(model: LoraModel) -> list[str]:
    prefix = next(n for n in model.layers if n.endswith("self_attn.q_proj")).split("0.self_attn")[0]
    return [f"{prefix}{i}." for i in range(len(model.hf.model.layers))]
