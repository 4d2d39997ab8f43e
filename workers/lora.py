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
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.parallel.tp import TP, copy_to, reduce_from, shard_factor
from workers.parallel.tp import active as tp_active

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
    segment_ends: torch.Tensor | None = None  # int32 ends of the runs on the device, if made
    # Under tensor parallelism: the last input that entered a col layer, and what copy_to
    # made of it, so that q/k/v (and gate/up), which read one tensor, share one copy_to and
    # their input gradients are summed over the ranks once instead of once per projection.
    entered: tuple[torch.Tensor, torch.Tensor] | None = None

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
        self.tp: TP | None = None  # set by tp.apply_tp, with tp_style "col" / "row" / "vocab"
        self.tp_style: str | None = None

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
            return self.forward_segments(x, routing.segments, routing.segment_ends)
        x = self._enter(x)
        y = self.base(x)  # [B, S, out]
        for slot, rows in routing.groups:
            w = self.adapters.get(slot)
            if w is None:
                continue
            xs = x if rows is None else x.index_select(0, rows)
            delta = self._delta(w, xs).to(y.dtype)  # [b, S, out]
            y = y + delta if rows is None else y.index_add(0, rows, delta)
        return self._leave(y)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_style not in ("col", "vocab") or not tp_active(self.tp):
            return x
        routing = self.router.routing
        if routing.entered is not None and routing.entered[0] is x:
            return routing.entered[1]
        entered = copy_to(x, self.tp)
        routing.entered = (x, entered)
        return entered

    def _leave(self, y: torch.Tensor) -> torch.Tensor:
        """A row layer's partial sums (base and LoRA delta together) summed over ranks."""
        return reduce_from(y, self.tp) if self.tp_style == "row" else y

    def forward_segments(
        self, x: torch.Tensor, segments: list[tuple[int, int, int]],
        ends: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [..., T, in] with adapter `slot` on tokens [start, end) of dimension -2.

        Several adapters: one grouped matmul per LoRA factor over the whole stream
        (`_grouped_delta`) when the device and shapes allow, else one pair per run. `ends`:
        the runs' ends as an int32 device tensor, when the caller made it once for many
        layers (a host-to-device copy per layer would stall the launch queue).
        """
        x = self._enter(x)
        if x.device.type == "cpu":
            return self._leave(self._per_segment(x, segments))
        y = self.base(x)  # [..., T, out]; not saved by its own backward, so adding in place is safe
        live = [seg for seg in segments if seg[0] in self.adapters]
        if not live:
            return self._leave(y)
        if len(segments) > 1 and _groupable(x, self.in_features, self.out_features):
            return self._leave(y.add_(self._grouped_delta(x, segments, ends)))
        for slot, start, end in live:
            w = self.adapters[slot]
            if start == 0 and end == x.shape[-2] and y.dim() == 2:
                # y += scale · (x Aᵀ) Bᵀ in the matmul's epilogue: no [T, out] delta tensor
                low = x @ w.A.to(x.dtype).T
                y.addmm_(low, w.B.to(x.dtype).T, alpha=w.scale)
            elif start == 0 and end == x.shape[-2]:
                y.add_(self._delta(w, x).to(y.dtype))
            else:
                y[..., start:end, :] += self._delta(w, x[..., start:end, :]).to(y.dtype)
        return self._leave(y)

    def _per_segment(self, x: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """The CPU's way: every run's rows through the base and its adapter on their own.
        The CPU's matmul rounds a row differently depending on how many rows share the call,
        so this keeps a run's numbers independent of the other runs in its pass: a run
        rebuilt by replaying its calls alone equals, bit for bit, the one that trained
        beside others (tests/unit/test_recovery.py). Segments cover the stream in order."""
        parts = []
        for slot, start, end in segments:
            xs = x[..., start:end, :]
            ys = self.base(xs)
            if (w := self.adapters.get(slot)) is not None:
                ys = ys + self._delta(w, xs).to(ys.dtype)
            parts.append(ys)
        return torch.cat(parts, dim=-2)

    def _grouped_delta(self, x: torch.Tensor, segments: list[tuple[int, int, int]],
                       ends: torch.Tensor | None = None) -> torch.Tensor:
        """Every run's LoRA delta with two `torch._grouped_mm` calls (one group per run).

        The runs' fp32 A and B are stacked, then cast and scaled once per call (a fixed
        number of kernels whatever the number of adapters). Ranks are zero-padded to a
        multiple of 8 (zero rows of A and columns of B add nothing and get zero gradients);
        a run without an adapter on this layer gets zero factors.
        """
        lead, rows = x.shape[:-1], x.reshape(-1, self.in_features)
        weights = [self.adapters.get(s) for s, _, _ in segments]
        rank = max(w.A.shape[0] for w in weights if w is not None)
        rank = -(-rank // 8) * 8
        As, Bs, scales = [], [], []
        for w in weights:
            if w is None:
                As.append(x.new_zeros(rank, self.in_features, dtype=torch.float32))
                Bs.append(x.new_zeros(self.out_features, rank, dtype=torch.float32))
                scales.append(0.0)
                continue
            pad = rank - w.A.shape[0]
            As.append(F.pad(w.A, (0, 0, 0, pad)) if pad else w.A)
            Bs.append(F.pad(w.B, (0, pad)) if pad else w.B)
            scales.append(w.scale)
        A = torch.stack(As).to(x.dtype)  # [G, r, in]
        B = torch.stack(Bs)  # [G, out, r]
        if len(set(scales)) == 1:
            B = (B * scales[0]).to(x.dtype)
        else:
            B = (B * torch.tensor(scales, device=x.device)[:, None, None]).to(x.dtype)
        if ends is None:
            ends = segment_ends(segments, x.device)
        # mat2 is [G, K, N] column-major per group: transposed views of [G, N, K] stacks.
        low = torch._grouped_mm(rows, A.transpose(1, 2), offs=ends)  # [T, r]
        delta = torch._grouped_mm(low, B.transpose(1, 2), offs=ends)  # [T, out]
        return delta.view(*lead, self.out_features)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def segment_ends(segments: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    return torch.tensor([e for _, _, e in segments], dtype=torch.int32, device=device)


def _groupable(x: torch.Tensor, in_features: int, out_features: int) -> bool:
    """torch._grouped_mm runs, in bf16, on sm90+ GPUs; its operands need rows of a multiple
    of 16 bytes. (The CPU never gets here: see `_per_segment`.)"""
    step = 16 // x.element_size()
    if in_features % step or out_features % step or not x.is_cuda:
        return False
    return x.dtype == torch.bfloat16 and _capability(x.device.index) >= (9, 0)


class LoraRouter:
    """Shared by every MultiLoraLinear of one model: holds the current batch's routing."""

    def __init__(self) -> None:
        self.routing = LoraRouting()

    @contextlib.contextmanager
    def route(self, slots: list[int], device: torch.device) -> Iterator[None]:
        with self._use(LoraRouting.from_slots(slots, device)):
            yield

    @contextlib.contextmanager
    def route_segments(self, segments: list[tuple[int, int, int]],
                       ends: torch.Tensor | None = None) -> Iterator[None]:
        with self._use(LoraRouting(segments=segments, segment_ends=ends)):
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
    """peft's default init: A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0 (so ΔW = 0).
    Under tensor parallelism the full A is drawn (the same numbers as on one GPU) and this
    rank keeps its part."""
    full_in, _ = getattr(layer, "full_features", (layer.in_features, layer.out_features))
    bound = 1.0 / math.sqrt(full_in)
    A = (torch.rand(rank, full_in, generator=generator, dtype=torch.float32) * 2 - 1)
    A = shard_factor(layer, "A", A * bound).contiguous().to(device).requires_grad_(True)
    B = torch.zeros(layer.out_features, rank, dtype=torch.float32, device=device)
    return LoraWeights(A=A, B=B.requires_grad_(True), scale=scale)
