"""Multi-LoRA linear layers: many adapters on one frozen base layer, chosen per batch row.

Each adapter lives in a numbered slot with its own rank, scale and target set. A forward
pass carries a `LoraRouting`: which slot each batch row uses. Rows of slot s get
`base(x) + scale_s · (x Aₛᵀ) Bₛᵀ`; rows of a slot that does not target this layer, or of
slot `BASE_SLOT`, get `base(x)` alone. Adapter A's parameters therefore only ever see A's
rows, and their gradients only come from A's rows.

Shapes: A [r, in], B [out, r] (peft's lora_A.weight / lora_B.weight layout).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

BASE_SLOT = -1  # rows that run on the base model only

# Projection groups a client can switch on: Tinker's train_attn / train_mlp / train_unembed.
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
UNEMBED = ("lm_head",)


@dataclass
class LoraWeights:
    """One adapter on one layer. `A`, `B` are leaf tensors (fp32 master weights)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraRouting:
    """Which slot each part of the current batch uses. Either per batch row — `groups`:
    [(slot, row_index [n] or None = every row)] — or, for a packed stream [1, T], per token
    run — `segments`: [(slot, start, end)] on the token dimension."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    segments: list[tuple[int, int, int]] | None = None

    @classmethod
    def from_slots(cls, slots: list[int], device: torch.device) -> LoraRouting:
        distinct = list(dict.fromkeys(slots))
        if len(distinct) == 1:
            return cls([(distinct[0], None)])
        groups = []
        for s in distinct:
            rows = [i for i, x in enumerate(slots) if x == s]
            groups.append((s, torch.tensor(rows, dtype=torch.long, device=device)))
        return cls(groups)


class MultiLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus any number of LoRA adapters keyed by slot.

    The low-rank product runs in the activations' dtype (bf16 on GPU) from the fp32 master
    weights; gradients flow back to the fp32 masters through the cast.
    """

    def __init__(self, base: nn.Linear, router: LoraRouter):
        super().__init__()
        self.base = base
        self.router = router
        self.adapters: dict[int, LoraWeights] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects projection weights
        return self.base.weight

    def _delta(self, w: LoraWeights, x: torch.Tensor) -> torch.Tensor:
        low = (x @ w.A.to(x.dtype).T) * w.scale  # [..., r]: scaling the narrow side is cheap
        return low @ w.B.to(x.dtype).T  # [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, in]
        routing = self.router.routing
        if routing.segments is not None:
            return self.forward_segments(x, routing.segments)
        y = self.base(x)  # [B, S, out]
        for slot, rows in routing.groups:
            w = self.adapters.get(slot)
            if w is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            delta = self._delta(w, xs).to(y.dtype)  # [b, S, out]
            y = y + delta if rows is None else y.index_add(0, rows, delta)
        return y

    def forward_segments(
        self, x: torch.Tensor, segments: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """x [..., T, in] with adapter `slot` on tokens [start, end) of dimension -2."""
        y = self.base(x)  # [..., T, out]; not saved by its own backward, so adding in place is safe
        for slot, start, end in segments:
            w = self.adapters.get(slot)
            if w is None:
                continue
            if start == 0 and end == x.shape[-2]:
                y.add_(self._delta(w, x).to(y.dtype))
            else:
                y[..., start:end, :] += self._delta(w, x[..., start:end, :]).to(y.dtype)
        return y


class LoraRouter:
    """Shared by every MultiLoraLinear of one model: holds the current batch's routing."""

    def __init__(self) -> None:
        self.routing = LoraRouting()

    @contextlib.contextmanager
    def route(self, slots: list[int], device: torch.device) -> Iterator[None]:
        with self._use(LoraRouting.from_slots(slots, device)):
            yield

    @contextlib.contextmanager
    def route_segments(self, segments: list[tuple[int, int, int]]) -> Iterator[None]:
        with self._use(LoraRouting(segments=segments)):
            yield

    @contextlib.contextmanager
    def _use(self, routing: LoraRouting) -> Iterator[None]:
        previous, self.routing = self.routing, routing
        try:
            yield
        finally:
            self.routing = previous


def target_names(train_attn: bool, train_mlp: bool, train_unembed: bool) -> tuple[str, ...]:
    return (
        (ATTN_PROJS if train_attn else ())
        + (MLP_PROJS if train_mlp else ())
        + (UNEMBED if train_unembed else ())
    )


def wrap_model(model: nn.Module) -> tuple[LoraRouter, dict[str, MultiLoraLinear]]:
    """Replace every projection Linear of a causal LM with a MultiLoraLinear, in place.

    Returns the shared router and the wrapped layers by their module name in the HF model
    (e.g. "model.layers.0.self_attn.q_proj", "lm_head").
    """
    router = LoraRouter()
    wrapped: dict[str, MultiLoraLinear] = {}
    names = set(ATTN_PROJS + MLP_PROJS + UNEMBED)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                layer = MultiLoraLinear(child, router)
                setattr(module, child_name, layer)
                wrapped[f"{name}.{child_name}" if name else child_name] = layer
    return router, wrapped


def init_lora_weights(
    layer: MultiLoraLinear, rank: int, scale: float, generator: torch.Generator,
    device: torch.device,
) -> LoraWeights:
    """peft's default init: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0 (so ΔW = 0)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    A = (torch.rand(rank, layer.in_features, generator=generator, dtype=torch.float32) * 2 - 1)
    A = (A * bound).to(device).requires_grad_(True)
    B = torch.zeros(layer.out_features, rank, dtype=torch.float32, device=device)
    return LoraWeights(A=A, B=B.requires_grad_(True), scale=scale)
