"""Continuous-batching generation: one running batch of sequences across decode steps.

`RunningBatch` owns the sampling side of the worker:

  admit(key, spec, adapter)  queue a request (its adapter's weights are referenced now, so a
                             slot reloaded later does not change a request already admitted)
  step(max_steps)            let waiting requests join (batched prefill), run up to
                             `max_steps` decode steps of every running sequence, and return
                             the requests that finished

Between steps sequences join and leave: a finished sequence frees its rows at once, and a
request answers when its last sample ends. Requests of different adapters, sampling
sessions and the base model share every step; at most `max_num_sequences` run at once, and
the rest wait in arrival order.

KV cache: one arena per layer, [capacity tokens, kv heads, head dim]. A sequence owns one
contiguous region of prompt + max_tokens tokens (known at admission, so nothing is padded
or moved); regions are first-fit allocated and freed when the sequence ends. A request's
prompt is prefilled once, into its first sample's region, and copied to the others'.
Attention reads the arena in place: prefill (and the unfused decode step) with one
flash-attention call per layer for the whole batch (`cu_seqlens_k` = region starts,
`seqused_k` = lengths), on the CPU one SDPA per row.

The decode step on CUDA is fused (`_decode_fused`, kernels in decode_kernels): per layer 4
matmuls and 4 Triton kernels that carry LoRA B (where `_lora_path` puts it), the norms,
RoPE, the K/V write into the arena, grouped-query attention over the arena and SiLU; steps
of a few rows do their large projections with decode_kernels.gemv. Its sampling (without
top-k / top-p) runs in sample_kernels. `fused=False` (and the CPU by default) runs the
unfused step, `_forward` with eager glue, and the compiled `choose`: the same arithmetic.

Projections that read the same input run as one matmul: q/k/v and gate/up per layer
(`fuse_base_weights` lays their base weights side by side once; the Linears keep views).
LoRA in a step: every adapter in the batch has a column range of R columns; per projection
group, A stacks the members' [R, in] blocks and scale·B is block-diagonal [Σ out, n·R]; a
per-row 0/1 mask keeps each row to its own adapter's columns:
y = base(x) + ((x Aᵀ) ⊙ mask) Bᵀ. A fixed number of dense matmuls whatever the mix of
adapters (no mask when every row uses the only adapter), and nothing that depends on the
batch's order. The fused step can instead add (x Aᵀ) Bᵀ inside its kernels, each row over
its own adapter's column range (`_DecodeInputs.cols`): no mask, and no other adapter's B
read; the running batch orders its rows by adapter so that blocks of rows span few.

Decode steps run as CUDA graphs on CUDA (`cuda_graphs`; torch.compile only fuses the
element-wise pieces of the unfused step and the sampling), one per batch-size bucket
(powers of two), LoRA width and kind of step, captured on first use; padded rows of a
bucket write to a scratch token of the arena. Elsewhere, or with graphs off, the same
function runs eagerly.
Between steps the host builds nothing while the rows stay the same (`_Steady`): the chosen
tokens are fed back and positions advance on the device, and the host reads each step's
tokens one step late, while the next step runs, so stop checks overlap the GPU's work. A
sequence that stops leaves its row idle (on the scratch token) until requests join or half
the rows idle, when the rows are rebuilt; its one extra step stays inside its own region.

Sampling is batch-independent by construction: sequence j of a request with seed s draws
token t with Gumbel noise hashed from (s, j, t, token id), so the same seed gives the same
tokens alone or in any batch. Temperature 0 is greedy; then temperature, top-k, top-p.
Returned logprobs are the raw model's (before temperature / top-k / top-p), as a training
forward computes them.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from protocol.jobs import UserError
from workers.lora import LoraWeights
from workers.model import LoraModel
from workers.parallel import tp
from workers.sampling import decode_kernels, sample_kernels
from workers.sampling.sampler import SampledSeq, SampleOutput, _prompt_outputs
from workers.training import fastpath

log = logging.getLogger(__name__)

Adapter = dict[str, LoraWeights]  # layer name -> weights, as LoraModel.adapter_weights gives


# --- the KV arena ---------------------------------------------------------------------------
class KVArena:
    """Per-layer K and V storage of `capacity` tokens (+1 scratch token) with a first-fit
    allocator of contiguous regions."""

    def __init__(self, layers: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (capacity + 1, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.scratch = capacity  # padded graph rows write here
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, size), by start

    def alloc(self, size: int) -> int | None:
        for i, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, free - size)
                return start
        return None

    def release(self, start: int, size: int) -> None:
        i = bisect.bisect(self._free, (start, size))
        self._free.insert(i, (start, size))
        # merge with the right, then the left neighbour
        if i + 1 < len(self._free) and start + size == self._free[i + 1][0]:
            self._free[i] = (start, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])

    @property
    def free_tokens(self) -> int:
        return sum(size for _, size in self._free)


# --- requests and sequences ------------------------------------------------------------------
@dataclass(eq=False)  # identity: sequences and requests are dict keys / set members
class _Seq:
    req: _Request
    index: int  # sample index within the request
    start: int  # region in the arena
    length: int = 0  # tokens in the cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


@dataclass(eq=False)
class _Request:
    key: Any
    spec: Any  # sampler.SampleSpec
    adapter: Adapter | None
    seed: int
    key_of_adapter: tuple[int, ...] | None = None  # adapter_key(adapter), computed once
    seqs: list[_Seq] = field(default_factory=list)
    prompt_out: tuple = (None, None)
    open: int = 0  # sequences still running

    @property
    def region(self) -> int:
        return len(self.spec.prompt) + self.spec.max_tokens


# --- projection groups and the LoRA table --------------------------------------------------
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


class _LoraTable:
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


def adapter_key(adapter: Adapter) -> tuple[int, ...]:
    """Identity of an adapter's weight tensors: requests of one sampler slot share a column
    range; a slot reloaded with new weights gets a new one."""
    return tuple(id(w.A) for w in adapter.values())


# --- the forward passes ----------------------------------------------------------------------
def _group(model: LoraModel, lora: _LoraTable, group: str, x: torch.Tensor,
           masks: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """One projection group: [N, in] -> [N, Σ out] with each row's LoRA. `masks[n]`: the
    rows' [N, n·R] column masks; an empty dict: every row has every column (one adapter);
    None: no LoRA. With LoRA one matmul gives [base output | x Aᵀ] (A rows follow the base
    weight), then the low-rank part adds into the base columns in place."""
    style = lora.styles[group]
    if masks is None or group not in lora.wide:
        weight, bias = model._fused_groups[group]  # type: ignore[attr-defined]
        y = F.linear(x, weight, bias)
        return tp.reduce_from(y, model.tp) if style == "row" else _gather(y, style, model)
    weight, bias = lora.wide[group]
    B = lora.B[group]
    y = F.linear(x, weight, bias)  # [N, Σ out + n·R]
    if style == "row":  # partial sums of the base output and of x Aᵀ alike (A is split too)
        y = tp.reduce_from(y, model.tp)
    out, low = y[:, : B.shape[0]], y[:, B.shape[0] :]
    if masks:
        low = low * masks[len(lora.groups[group])]
    return _gather(out.addmm_(low, B.T), style, model)


def _gather(y: torch.Tensor, style: str | None, model: LoraModel) -> torch.Tensor:
    return tp.gather_vocab(y, model.tp) if style == "vocab" else y


def _forward(model: LoraModel, lora: _LoraTable, tokens: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None, attend: Callable[..., torch.Tensor],
             pick: torch.Tensor | None = None, uniform: bool = False) -> torch.Tensor:
    """Tokens [N] -> logits [N or len(pick), V] through the base model + the LoRA table.
    `attend(layer_index, q, k, v, scale)` stores k/v and returns attention output [N, H, D].
    `mask` [N, R]: each row's adapter columns; `uniform`: every row uses the one adapter."""
    kern, body, names = fastpath.KERNELS, model.hf.model, lora.prefixes
    masks = _row_masks(lora, mask, uniform)
    h = body.embed_tokens(tokens)
    cos, sin = body.rotary_emb(h[None], positions[None])
    cos, sin = cos[0], sin[0]
    n, down = h.shape[0], None
    for i, layer in enumerate(body.layers):
        attn, ln1, ln2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
        p, dim = names[i], attn.head_dim
        if down is None:
            x = kern.rms_norm(h, ln1.weight, ln1.variance_epsilon)
        else:  # the previous layer's residual add, fused into this norm
            h, x = kern.add_rms_norm(h, down, ln1.weight, ln1.variance_epsilon)
        q_out = attn.q_proj.out_features
        k_out = attn.k_proj.out_features
        qkv = _group(model, lora, p + "qkv", x, masks)
        q = qkv[:, :q_out].view(n, -1, dim)
        k = qkv[:, q_out : q_out + k_out].view(n, -1, dim)
        v = qkv[:, q_out + k_out :].view(n, -1, dim)
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        q, k = kern.qk_rope(q, k, None if qn is None else qn.weight,
                            None if kn is None else kn.weight,
                            0.0 if qn is None else qn.variance_epsilon, cos, sin)
        o = attend(i, q, k, v, attn.scaling).reshape(n, -1)
        h, x = kern.add_rms_norm(h, _group(model, lora, p + "o", o, masks),
                                 ln2.weight, ln2.variance_epsilon)
        gate_up = _group(model, lora, p + "gate_up", x, masks)
        inter = gate_up.shape[1] // 2
        act = kern.silu_mul(gate_up[:, :inter], gate_up[:, inter:])
        down = _group(model, lora, p + "down", act, masks)
    _, h = kern.add_rms_norm(h, down, body.norm.weight, body.norm.variance_epsilon)
    if pick is not None:
        h = h[pick]
        if masks:
            masks = {1: masks[1][pick]}
    return _group(model, lora, "lm_head", h, masks)


def _row_masks(lora: _LoraTable, mask: torch.Tensor | None, uniform: bool,
               members: tuple[int, ...] = (1, 2, 3)) -> dict[int, torch.Tensor] | None:
    """`_group`'s masks: per number of group members n, the rows' [N, n·R] column masks;
    {} when every row uses the table's one adapter; None without LoRA."""
    if uniform and lora.width:
        return {}
    return None if mask is None else {n: mask.repeat(1, n) for n in members}


def _layer_names(model: LoraModel) -> list[str]:
    prefix = next(n for n in model.layers if n.endswith("self_attn.q_proj")).split("0.self_attn")[0]
    return [f"{prefix}{i}." for i in range(len(model.hf.model.layers))]


def _matmul(model: LoraModel, lora: _LoraTable, group: str, x: torch.Tensor,
            masks: dict[int, torch.Tensor] | None, gemv: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection group's output for the fused step, and the B its kernel still has to
    apply (None: nothing left). With `masks` that is `_group`'s output (LoRA B added by an
    addmm); else y = [base output | x Aᵀ] (summed over ranks when the group is
    row-parallel) and the group's B (None without LoRA). `gemv`: the matmul by
    decode_kernels.gemv (steps of a few rows)."""
    if masks is not None:
        return _group(model, lora, group, x, masks), None
    wide = group in lora.wide
    weight, bias = (lora.wide[group] if wide
                    else model._fused_groups[group])  # type: ignore[attr-defined]
    gemv = gemv and bias is None and (weight.numel() * weight.element_size() >= GEMV_MIN_BYTES
                                      and weight.shape[1] <= GEMV_MAX_K)
    y = decode_kernels.gemv(x, weight) if gemv else None
    if y is None:
        y = F.linear(x, weight, bias)
    if lora.styles[group] == "row":
        y = tp.reduce_from(y, model.tp)
    return y, lora.B[group] if wide else None


def _flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  x: _DecodeInputs, scale: float) -> torch.Tensor:
    """Decode attention with one flash-attention call over the arena: q [N, Hq, D] ->
    [N, Hq, D] (`cu_seqlens_k` = region starts, `seqused_k` = lengths)."""
    n, heads, d = q.shape
    kv = k_cache.shape[1]
    group = heads // kv
    if group == 1 or n < PACK_GQA_ROWS:
        return torch.ops.aten._flash_attention_forward(
            q, k_cache, v_cache, x.cu_q, x.starts, 1, x.max_len, 0.0, True, False,
            scale=scale, seqused_k=x.used)[0]
    # The query heads sharing a KV head ride as `group` query rows of one sequence over that
    # KV head, so each tile of the kernel (rows of queries) holds `group` live rows instead
    # of 1: the same keys, `group` times less wasted work. Not causal: every row is the
    # newest token and sees all keys.
    rows = q.view(n, kv, group, d).transpose(1, 2).reshape(n * group, kv, d)
    out = torch.ops.aten._flash_attention_forward(
        rows, k_cache, v_cache, x.cu_q * group, x.starts, group, x.max_len, 0.0, False, False,
        scale=scale, seqused_k=x.used)[0]
    return out.view(n, group, kv, d).transpose(1, 2).reshape(n, heads, d)


def _decode_fused(model: LoraModel, lora: _LoraTable, x: _DecodeInputs, arena: KVArena,
                  flash: bool = False, path: str = "gemv") -> torch.Tensor:
    """One decode step, tokens [N] -> logits [N, V], as 4 matmuls and 4 Triton kernels per
    layer (decode_kernels): LoRA B, norms, RoPE, the K/V write and SiLU ride in the kernels
    between the matmuls. The same arithmetic as `_forward`, fewer launches. `path`: where
    LoRA B is added (`RunningBatch._lora_path`)."""
    dk, body = decode_kernels, model.hf.model
    h = body.embed_tokens(x.tokens)  # [N, hidden], the residual stream (updated in place)
    cos, sin = body.rotary_emb(h[None], x.positions[None])
    cos, sin, n = cos[0], sin[0], h.shape[0]
    layers, kv_heads = body.layers, arena.k[0].shape[1]
    splits = dk.splits(n, kv_heads, x.max_len, h.device)
    rows = 16 if path == "dots" else 1  # rows per program of the kernels
    gemv = n <= GEMV_ROWS
    masks = _row_masks(lora, x.mask, x.uniform, (1, 2, 3) if path == "addmm" else (1,))
    layer_masks = masks if path == "addmm" else None  # (else only the LM head takes them)
    ln = layers[0].input_layernorm
    xin = fastpath.KERNELS.rms_norm(h, ln.weight, ln.variance_epsilon)
    for i, layer in enumerate(layers):
        attn, p = layer.self_attn, lora.prefixes[i]
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        y, B = _matmul(model, lora, p + "qkv", xin, layer_masks, gemv)
        q = dk.qkv_epilogue(y, B, x.cols, None if qn is None else qn.weight,
                            None if kn is None else kn.weight,
                            0.0 if qn is None else qn.variance_epsilon, cos, sin, arena.k[i],
                            arena.v[i], x.write, attn.q_proj.out_features // attn.head_dim,
                            rows)
        if flash:
            o = _flash_decode(q, arena.k[i], arena.v[i], x, attn.scaling)
        else:
            o = dk.attention(q, arena.k[i], arena.v[i], x.starts, x.used, attn.scaling, splits)
        y, B = _matmul(model, lora, p + "o", o.view(n, -1), layer_masks, gemv)
        ln = layer.post_attention_layernorm
        xin = dk.add_norm(y, B, x.cols, h, ln.weight, ln.variance_epsilon, rows)
        y, B = _matmul(model, lora, p + "gate_up", xin, layer_masks, gemv)
        act = dk.silu_mul(y, B, x.cols, layer.mlp.gate_proj.out_features, rows)
        y, B = _matmul(model, lora, p + "down", act, layer_masks, gemv)
        ln = layers[i + 1].input_layernorm if i + 1 < len(layers) else body.norm
        xin = dk.add_norm(y, B, x.cols, h, ln.weight, ln.variance_epsilon, rows)
    return _group(model, lora, "lm_head", xin, masks)


# --- sampling --------------------------------------------------------------------------------
# Decode steps of at least this many rows pack a GQA group's query heads into one sequence
# of `group` rows for the attention kernel (see _flash_decode); smaller steps are
# latency-bound, and the two reshuffles would cost more than the kernel's wasted rows.
PACK_GQA_ROWS = 16
# Where the fused step adds LoRA B (RunningBatch._lora_path; measured on an H100 with
# `benchmarks.sampler --lora-placement`): inside the kernels a row per program ("gemv":
# each row reads only its adapter's B) in steps of at most LORA_GEMV_ROWS rows, or of at
# most MIXED_GEMV_ROWS when the rows use several adapters; larger steps of one adapter
# with an addmm per projection group ("addmm": B read once); larger mixed ones inside the
# kernels 16 rows per program ("dots": tensor-core dots over the adapters of each block of
# rows, which the running batch groups by adapter), where the addmm would read every
# adapter's B and mask the rows first.
LORA_GEMV_ROWS = 8
MIXED_GEMV_ROWS = 32
# Fused steps of at most this many rows do their large projections (weights of at least
# GEMV_MIN_BYTES, K at most GEMV_MAX_K) with decode_kernels.gemv, which read them faster
# than cuBLAS (4B's q/k/v, o and gate/up on an H100: 13.7 / 11.0 / 36.1 µs against
# 14.4 / 11.7 / 39.5, `benchmarks.decode_kernels`). Not 0.6B's, where both take about
# 5.5 µs, a launch's worth, nor a long K (4B's down: a program per 32 columns streams all of
# K alone; cuBLAS splits K), 23.4 against 21.7.
GEMV_ROWS = 8
GEMV_MIN_BYTES = 16 << 20
GEMV_MAX_K = 4096

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 multipliers, as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (logical shifts by masking the sign extension)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_noise(streams: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] from a hash of (stream, step, token id): the same numbers
    for a sequence whatever else shares the batch."""
    base = _mix(streams * _GOLDEN + steps)  # [B]
    ids = torch.arange(vocab, device=streams.device, dtype=torch.int64)
    bits = _mix(base[:, None] ^ ids[None, :])  # (no int64 literal times the index: Triton)
    # 23 bits: k + 0.5 is exact in float32, so u < 1 (with 24, the top k rounds u to 1 and
    # the noise to +inf: that id would win whatever its logit)
    u = (((bits >> 41) & ((1 << 23) - 1)).float() + 0.5) * (1.0 / (1 << 23))  # (0, 1)
    return -torch.log(-torch.log(u))


def choose(logits: torch.Tensor, temps: torch.Tensor, streams: torch.Tensor,
           steps: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row [B] and its raw-model logprob [B] from logits [B, V].
    temps[b] = 0 means greedy."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    greedy = temps <= 0
    scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
    if top_k is not None and top_p is not None:
        scaled = _filter(scaled, top_k, top_p)
    noisy = scaled + gumbel_noise(streams, steps, logits.shape[-1])
    tokens = torch.where(greedy, logits.argmax(-1), noisy.argmax(-1))
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


_CHOOSE = [choose]  # swapped for a compiled version by compile_sampling()


def compile_sampling() -> None:
    """torch.compile `choose` (dynamic shapes): noise, scaling, argmax and logprob fused
    into a few kernels over [B, V] instead of a dozen full passes."""
    if _CHOOSE[0] is choose:
        _CHOOSE[0] = torch.compile(choose, dynamic=True)


def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p per row (dropped tokens at -inf, at least one kept). A row with
    top_p = 1 keeps its whole top-k set, so it comes out as if unfiltered."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    keep = rank[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, -math.inf), dim=-1)
    before = probs.cumsum(-1) - probs
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1)
    return scaled.masked_fill(~torch.zeros_like(keep).scatter(-1, order, keep), -math.inf)


def _stream(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (1 << 62)


# --- the running batch -----------------------------------------------------------------------
class RunningBatch:
    def __init__(self, model: LoraModel, decode: Callable[[list[int]], str],
                 eos_token_ids: list[int], max_num_sequences: int = 256, kv_tokens: int = 0,
                 cuda_graphs: bool = True, fused: bool | None = None):
        self.model = model
        # decode steps through decode_kernels and their sampling (without top-k / top-p)
        # through sample_kernels (default: on CUDA, when Triton is there)
        self.fused = (model.device.type == "cuda" and decode_kernels.available(model.device)
                      and fastpath.supported(model.hf)) if fused is None else fused
        # the fused step's attention: flash attention for steps of at least this many rows,
        # else (None: always) the Triton kernel, which measured faster at every size
        self.flash_rows: int | None = None
        # where the fused step adds LoRA B: "gemv", "dots" or "addmm"; None: by the step's
        # rows and adapters (_lora_path)
        self.lora_path: str | None = None
        self.decode = decode
        self.eos = set(eos_token_ids)
        self.max_num_sequences = max_num_sequences
        self._kv_tokens = kv_tokens
        self.arena: KVArena | None = None
        fuse_base_weights(model)
        self.lora = _LoraTable(model)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Seq] = []
        self.steady: _Steady | None = None  # the running rows' inputs, kept on the device
        self.rng = random.Random()  # seeds of unseeded requests (the same on every TP rank)
        self.graphs = _Graphs(self) if cuda_graphs and model.device.type == "cuda" else None

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # --- admission -------------------------------------------------------------------------
    def admit(self, key: Any, spec: Any, adapter: Adapter | None) -> None:
        """Queue a validated request (sampler.SampleSpec) with its adapter's weights."""
        arena = self._arena()
        request = _Request(key, spec, adapter,
                           self.rng.getrandbits(62) if spec.seed is None else spec.seed,
                           None if adapter is None else adapter_key(adapter))
        if spec.num_samples > self.max_num_sequences:
            raise UserError(f"num_samples={spec.num_samples} exceeds the sampler's "
                            f"max_num_sequences={self.max_num_sequences}")
        if request.region * spec.num_samples > arena.capacity:
            raise UserError(
                f"num_samples × (prompt + max_tokens) = {request.region * spec.num_samples} "
                f"tokens exceeds the sampler's KV cache of {arena.capacity} tokens")
        self.waiting.append(request)

    def _arena(self) -> KVArena:
        if self.arena is None:
            c, m = self.model.config, self.model
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            k_proj = next(v for n, v in m.layers.items() if n.endswith("k_proj"))
            kv_heads = k_proj.out_features // head_dim  # this rank's, under tensor parallelism
            dtype = next(m.hf.parameters()).dtype
            per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * (
                torch.finfo(dtype).bits // 8)
            tokens = self._kv_tokens or tp.agree_min(_auto_kv_tokens(m.device, per_token), m.tp)
            self.arena = KVArena(c.num_hidden_layers, tokens, kv_heads, head_dim,
                                 dtype, m.device)
            log.info("sampler KV cache: %d tokens (%.1f GiB)", tokens,
                     tokens * per_token / 2**30)
        return self.arena

    # --- the loop --------------------------------------------------------------------------
    def step(self, max_steps: int) -> list[tuple[Any, Any]]:
        """Admit what fits, run up to `max_steps` decode steps; (key, SampleOutput | error)
        for every request that finished."""
        done: list[_Request] = []
        with torch.inference_mode():
            if self.waiting:
                self._flush(done)  # joining changes the rows: the host must be current
                joined = self._join()
                if joined:
                    self._prefill(joined, done)
                    self.steady = None
            for _ in range(max_steps):
                if not self.running:
                    break
                self._decode_step(done)
            self._flush(done)
        out = []
        for r in done:
            seqs = [SampledSeq(s.tokens, s.logprobs, s.stop_reason or "length") for s in r.seqs]
            out.append((r.key, SampleOutput(seqs, *r.prompt_out)))
        return out

    def _join(self) -> list[_Request]:
        arena, joined = self._arena(), []
        while self.waiting:
            r = self.waiting[0]
            if len(self.running) + sum(len(j.seqs) for j in joined) + r.spec.num_samples > (
                    self.max_num_sequences):
                break
            starts = []
            for _ in range(r.spec.num_samples):
                start = arena.alloc(r.region)
                if start is None:
                    break
                starts.append(start)
            if len(starts) < r.spec.num_samples:
                for s in starts:
                    arena.release(s, r.region)
                break  # waits for running sequences to free their regions
            self.waiting.popleft()
            r.seqs = [_Seq(r, j, s) for j, s in enumerate(starts)]
            r.open = len(r.seqs)
            joined.append(r)
        if joined:
            needed = {r.key_of_adapter: r.adapter
                      for r in joined + [s.req for s in self.running] if r.adapter is not None}
            changed = set(needed) != set(self.lora.adapters)
            if changed and self.lora.rebuild(list(needed.values())) and self.graphs:
                self.graphs.graphs.clear()  # they captured the old buffers
        return joined

    def _uniform(self, keys: list[tuple[int, ...] | None]) -> bool:
        """Every row on the table's only adapter: its LoRA needs no row mask."""
        return (len(self.lora.adapters) == 1 and keys[0] in self.lora.adapters
                and len(set(keys)) == 1)

    def _columns(self, keys: list[tuple[int, ...] | None], repeats: list[int] | None = None
                 ) -> torch.Tensor:
        """Each row's LoRA columns [lo, hi) in the table, [rows, 2] int32 (lo = hi: none);
        with `repeats`, key i stands for repeats[i] rows."""
        device = self.model.device
        cols = torch.tensor([self.lora.columns(k) for k in keys], dtype=torch.int32,
                            device=device)
        if repeats is None:
            return cols
        return cols.repeat_interleave(torch.tensor(repeats, device=device), dim=0)

    def _mask(self, keys: list[tuple[int, ...] | None], repeats: list[int] | None = None,
              cols: torch.Tensor | None = None) -> torch.Tensor | None:
        """The rows' 0/1 masks over the table's columns [rows, R] (None: no LoRA, or every
        row on the one adapter); from `cols` when the caller has them."""
        if not self.lora.width or self._uniform(keys):
            return None
        if cols is None:
            cols = self._columns(keys, repeats)
        col = torch.arange(self.lora.width, device=cols.device)
        dtype = next(self.model.hf.parameters()).dtype
        return ((col[None] >= cols[:, :1]) & (col[None] < cols[:, 1:])).to(dtype)

    def _prefill(self, joined: list[_Request], done: list[_Request]) -> None:
        model, arena, device = self.model, self._arena(), self.model.device
        lengths = [len(r.spec.prompt) for r in joined]
        tokens = torch.tensor([t for r in joined for t in r.spec.prompt], device=device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        write = torch.cat([torch.arange(r.seqs[0].start, r.seqs[0].start + n)
                           for r, n in zip(joined, lengths, strict=True)]).to(device)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        varlen = fastpath.VarlenAttention(cu, device)

        def attend(i, q, k, v, scale):
            arena.k[i].index_copy_(0, write, k)
            arena.v[i].index_copy_(0, write, v)
            return varlen(q, k, v.contiguous(), scale)

        keys = [r.key_of_adapter for r in joined]
        mask, uniform = self._mask(keys, lengths), self._uniform(keys)
        full = [r.spec.prompt_logprobs or r.spec.topk_prompt_logprobs > 0 for r in joined]
        # logits for every prompt position of requests that want prompt logprobs, else the last
        pick = torch.tensor([p for r, s, e, f in zip(joined, cu[:-1], cu[1:], full, strict=True)
                             for p in (range(s, e) if f else [e - 1])], device=device)
        logits = _forward(model, self.lora, tokens, positions, mask, attend, pick, uniform)
        # The prompt's KV goes to every other sample's region.
        src, dst = [], []
        for r, n in zip(joined, lengths, strict=True):
            for s in r.seqs[1:]:
                src.append(torch.arange(r.seqs[0].start, r.seqs[0].start + n))
                dst.append(torch.arange(s.start, s.start + n))
        if src:
            src_t, dst_t = torch.cat(src).to(device), torch.cat(dst).to(device)
            for i in range(len(arena.k)):
                arena.k[i].index_copy_(0, dst_t, arena.k[i][src_t])
                arena.v[i].index_copy_(0, dst_t, arena.v[i][src_t])
        last, k = [], 0
        for r, n, f in zip(joined, lengths, full, strict=True):
            rows = n if f else 1
            if f:
                r.prompt_out = _prompt_outputs(r.spec, logits[k : k + rows])
            last.append(logits[k + rows - 1])
            for s in r.seqs:
                s.length = n
            k += rows
        first = torch.stack(last)  # [R, V]: every sample of a request starts from it
        seqs = [s for r in joined for s in r.seqs]
        fan = torch.tensor([i for i, r in enumerate(joined) for _ in r.seqs], device=device)
        self._choose_and_advance(first[fan], seqs, done)
        self.running.extend(s for s in seqs if s.stop_reason is None)

    def _decode_step(self, done: list[_Request]) -> None:
        """Launch one step from the device-side inputs, feed its tokens back on the device,
        then read the previous step's tokens (ready by now) while this one runs."""
        st = self.steady
        if st is None or st.stale:
            self._flush(done)
            # rows grouped by adapter (a stable sort): a block of rows in the fused kernels
            # then spans few adapters' columns
            self.running.sort(key=lambda s: self.lora.columns(s.req.key_of_adapter))
            st = self.steady = _Steady.build(self)
        logits = self.graphs.run(st.x) if self.graphs is not None else self._decode_forward(st.x)
        for s in self.running:
            s.length += 1  # the fed token's K/V is in the cache now
        tokens, logprobs = self._choose(logits, st.sampling)
        st.advance(tokens)
        previous, st.pending = st.pending, _to_host(tokens, logprobs)
        if previous is not None:
            self._collect(st, previous, done)

    def _flush(self, done: list[_Request]) -> None:
        st = self.steady
        if st is not None and st.pending is not None:
            pending, st.pending = st.pending, None
            self._collect(st, pending, done)

    def _collect(self, st: _Steady, pending: tuple, done: list[_Request]) -> None:
        """Record a step's tokens; a sequence that stops leaves its row idle (it writes to
        the scratch token) until the rows are rebuilt."""
        tokens, logprobs, ready = pending
        if ready is not None:
            ready.synchronize()
        ended = []
        for row, (s, t, lp) in enumerate(zip(st.rows, tokens.tolist(), logprobs.tolist(),
                                             strict=True)):
            if s is None:
                continue
            self._record(s, t, lp, done)
            if s.stop_reason is not None:
                st.rows[row] = None
                ended.append(row)
        if ended:
            st.idle(ended, self.arena.scratch)  # type: ignore[union-attr]
            self.running = [s for s in st.rows if s is not None]

    def _decode_forward(self, x: _DecodeInputs) -> torch.Tensor:
        arena = self._arena()
        if self.fused:
            rows = len(x.tokens)
            return _decode_fused(self.model, self.lora, x, arena, self._flash(rows),
                                 self._lora_path(rows, x.mask is not None))
        if not x.tokens.is_cuda:  # the per-row CPU attention reads where each row is now
            rows_at, rows_used = x.starts[:-1].tolist(), x.used.tolist()

        def attend(i, q, k, v, scale):
            arena.k[i].index_copy_(0, x.write, k)
            arena.v[i].index_copy_(0, x.write, v)
            if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
                return _flash_decode(q, arena.k[i], arena.v[i], x, scale)
            out = []
            for b, (s, m) in enumerate(zip(rows_at, rows_used, strict=True)):
                kk, vv = arena.k[i][s : s + m], arena.v[i][s : s + m]
                groups = q.shape[1] // kk.shape[1]
                kk, vv = kk.repeat_interleave(groups, 1), vv.repeat_interleave(groups, 1)
                out.append(F.scaled_dot_product_attention(
                    q[b : b + 1].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                    scale=scale).transpose(0, 1))
            return torch.cat(out)

        return _forward(self.model, self.lora, x.tokens, x.positions, x.mask, attend,
                        uniform=x.uniform)

    def _lora_path(self, rows: int, several: bool) -> str:
        """Where a fused step of `rows` rows adds LoRA B; `several`: its rows use more than
        one adapter (or some none). See LORA_GEMV_ROWS."""
        if self.lora_path is not None:
            return self.lora_path
        if rows <= LORA_GEMV_ROWS or (several and rows <= MIXED_GEMV_ROWS):
            return "gemv"
        return "dots" if several else "addmm"

    def _flash(self, rows: int) -> bool:
        """Whether the fused step of this many rows takes flash attention."""
        return (self.model.device.type == "cuda" and self.flash_rows is not None
                and rows >= self.flash_rows)

    def _sampling(self, seqs: list[_Seq]) -> _Sampling | None:
        """Per-row sampling tensors; None when every row is greedy."""
        device, specs = self.model.device, [s.req.spec for s in seqs]
        vocab = self.model.config.vocab_size
        filtered = any(0 < sp.top_k < vocab or sp.top_p < 1 for sp in specs)
        if not filtered and all(sp.temperature <= 0 for sp in specs):
            return None
        return _Sampling(
            temps=torch.tensor([sp.temperature for sp in specs], device=device),
            streams=torch.tensor([_stream(s.req.seed, s.index) for s in seqs], device=device),
            steps=torch.tensor([len(s.tokens) for s in seqs], device=device),
            top_k=torch.tensor([sp.top_k if 0 < sp.top_k < vocab else vocab for sp in specs],
                               device=device) if filtered else None,
            top_p=torch.tensor([sp.top_p for sp in specs], device=device) if filtered else None,
        )

    def _choose(self, logits: torch.Tensor, sampling: _Sampling | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused and (sampling is None or sampling.top_k is None):
            # the sampling kernels (each row's vocabulary over many programs); with top-k /
            # top-p, the compiled `choose` (its sort-based filter)
            if sampling is None:  # all greedy
                zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
                return sample_kernels.choose(logits, zeros.float(), zeros, zeros)
            return sample_kernels.choose(logits, sampling.temps, sampling.streams,
                                         sampling.steps)
        if sampling is None:  # all greedy
            logp = torch.log_softmax(logits.float(), dim=-1)
            tokens = logp.argmax(-1)
            return tokens, logp.gather(-1, tokens[:, None])[:, 0]
        sp = sampling
        return _CHOOSE[0](logits, sp.temps, sp.streams, sp.steps, sp.top_k, sp.top_p)

    def _choose_and_advance(self, logits: torch.Tensor, seqs: list[_Seq],
                            done: list[_Request]) -> None:
        tokens, logprobs = self._choose(logits, self._sampling(seqs))
        for s, t, lp in zip(seqs, tokens.tolist(), logprobs.tolist(), strict=True):
            self._record(s, t, lp, done)

    def _record(self, s: _Seq, token: int, logprob: float, done: list[_Request]) -> None:
        s.tokens.append(token)
        s.logprobs.append(logprob)
        s.stop_reason = self._stop_reason(s)
        if s.stop_reason is not None:
            self._finish(s, done)

    def _stop_reason(self, s: _Seq) -> str | None:
        spec, token = s.req.spec, s.tokens[-1]
        if token in spec.stop_token_ids or (spec.stop_at_eos and token in self.eos):
            return "stop"
        if spec.stop_strings:  # decoded whole: strings that span tokens are caught
            text = self.decode(s.tokens)
            if any(x in text for x in spec.stop_strings):
                return "stop"
        return "length" if len(s.tokens) >= spec.max_tokens else None

    def _finish(self, s: _Seq, done: list[_Request]) -> None:
        self._arena().release(s.start, s.req.region)
        s.req.open -= 1
        if s.req.open == 0:
            done.append(s.req)

    def fail_all(self, error: Exception) -> list[tuple[Any, Exception]]:
        """Drop every request (after an unexpected error) and free the cache."""
        requests = list(self.waiting) + list(dict.fromkeys(s.req for s in self.running))
        for s in self.running:
            self._arena().release(s.start, s.req.region)
        self.waiting.clear()
        self.running = []
        self.steady = None
        return [(r.key, error) for r in requests]


def _auto_kv_tokens(device: torch.device, per_token: int) -> int:
    if device.type != "cuda":  # at most 64k tokens and 2 GiB of host memory
        return max(1024, min(1 << 16, (2 << 30) // per_token))
    free, _ = torch.cuda.mem_get_info(device)
    return max(4096, int(0.3 * free / per_token))


# --- decode inputs and CUDA graphs -----------------------------------------------------------
@dataclass
class _DecodeInputs:
    tokens: torch.Tensor  # [B] last token of each sequence
    positions: torch.Tensor  # [B]
    write: torch.Tensor  # [B] arena index its K/V goes to
    starts: torch.Tensor  # [B + 1] int32 region starts (the last entry unused)
    used: torch.Tensor  # [B] int32 keys after this step
    cu_q: torch.Tensor  # [B + 1] int32 0..B
    mask: torch.Tensor | None  # [B, R]; None: no LoRA, or `uniform`
    uniform: bool  # every row on one adapter (no mask needed)
    max_len: int
    cols: torch.Tensor  # [B, 2] int32: each row's LoRA columns [lo, hi) (the fused step's mask)

    @classmethod
    def build(cls, seqs: list[_Seq], batch: RunningBatch) -> _DecodeInputs:
        device = batch.model.device
        keys = [s.req.key_of_adapter for s in seqs]
        cols = batch._columns(keys)
        starts = [s.start for s in seqs]
        used = [s.length + 1 for s in seqs]
        host = torch.tensor([[s.tokens[-1], s.length, s.start + s.length] for s in seqs])
        host = host.to(device)
        return cls(
            tokens=host[:, 0], positions=host[:, 1], write=host[:, 2],
            starts=torch.tensor(starts + [batch.arena.scratch], dtype=torch.int32,
                                device=device),
            used=torch.tensor(used, dtype=torch.int32, device=device),
            cu_q=torch.arange(len(seqs) + 1, dtype=torch.int32, device=device),
            mask=batch._mask(keys, cols=cols), uniform=batch._uniform(keys),
            max_len=max(s.req.region for s in seqs), cols=cols,
        )


@dataclass
class _Sampling:
    temps: torch.Tensor  # [B]; 0 = greedy
    streams: torch.Tensor  # [B] noise stream of (seed, sample index)
    steps: torch.Tensor  # [B] index of the token being chosen
    top_k: torch.Tensor | None  # [B], or None when no row filters
    top_p: torch.Tensor | None


@dataclass(eq=False)
class _Steady:
    """The running rows' decode inputs, kept on the device between steps: each step's tokens
    are fed back and positions advance there, so an unchanged set of rows costs the host no
    tensor building, and the host reads a step's tokens one step late, while the next step
    runs. A row whose sequence ended idles (reads and writes the scratch token) until
    requests join or half the rows idle; then the rows are rebuilt from the host's state."""

    rows: list[_Seq | None]
    x: _DecodeInputs
    alive: torch.Tensor  # [B] int32, 0 for idle rows
    sampling: _Sampling | None
    pending: tuple | None = None  # the last step's (tokens, logprobs, ready event) on host
    stale: bool = False

    @classmethod
    def build(cls, batch: RunningBatch) -> _Steady:
        rows = list(batch.running)
        return cls(list(rows), _DecodeInputs.build(rows, batch),
                   torch.ones(len(rows), dtype=torch.int32, device=batch.model.device),
                   batch._sampling(rows))

    def advance(self, tokens: torch.Tensor) -> None:
        x = self.x
        x.tokens.copy_(tokens)
        x.positions += self.alive
        x.write += self.alive
        x.used += self.alive
        if self.sampling is not None:
            self.sampling.steps += 1

    def idle(self, rows: list[int], scratch: int) -> None:
        for row in rows:
            self.x.write[row] = scratch
            self.x.starts[row] = scratch
            self.x.used[row] = 1
            self.alive[row] = 0
        self.stale = 2 * sum(s is not None for s in self.rows) <= len(self.rows)


def _to_host(tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple:
    """Start copying a step's results to the host; (tokens, logprobs, event to wait on)."""
    if tokens.device.type != "cuda":
        return tokens, logprobs, None
    out = (tokens.to("cpu", non_blocking=True), logprobs.to("cpu", non_blocking=True))
    ready = torch.cuda.Event()
    ready.record()
    return (*out, ready)


class _Graphs:
    """One CUDA graph per (batch bucket, LoRA width, one-adapter batch, kind of step):
    static inputs, replayed per step."""

    def __init__(self, batch: RunningBatch):
        self.batch = batch
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, _DecodeInputs, torch.Tensor]] = {}
        self.max_len = 0

    def run(self, x: _DecodeInputs) -> torch.Tensor:
        b = x.tokens.shape[0]
        bucket = 1 << max(0, (b - 1).bit_length())
        width, fused = self.batch.lora.width, self.batch.fused
        key = (bucket, width, x.uniform, fused, fused and self.batch._flash(bucket),
               fused and self.batch._lora_path(bucket, bool(width) and not x.uniform))
        if key not in self.graphs or x.max_len > self.max_len:
            if x.max_len > self.max_len:  # graphs bake the longest region in: recapture all
                self.max_len = max(x.max_len, 2 * self.max_len, 1024)
                self.graphs.clear()
            self.graphs[key] = self._capture(bucket, x.uniform)
        graph, static, out = self.graphs[key]
        scratch = self.batch.arena.scratch
        for name in ("tokens", "positions"):
            getattr(static, name)[:b].copy_(getattr(x, name))
            getattr(static, name)[b:].zero_()
        static.write[:b].copy_(x.write)
        static.write[b:].fill_(scratch)
        static.starts[:b].copy_(x.starts[:b])
        static.starts[b:].fill_(scratch)
        static.used[:b].copy_(x.used)
        static.used[b:].fill_(1)
        static.cols[:b].copy_(x.cols)
        static.cols[b:].zero_()
        if static.mask is not None and x.mask is not None:
            static.mask[:b].copy_(x.mask)
            static.mask[b:].zero_()
        graph.replay()
        return out[:b]

    def _capture(self, bucket: int, uniform: bool
                 ) -> tuple[torch.cuda.CUDAGraph, _DecodeInputs, torch.Tensor]:
        batch, device = self.batch, self.batch.model.device
        scratch = batch.arena.scratch
        width = batch.lora.width
        dtype = next(batch.model.hf.parameters()).dtype
        static = _DecodeInputs(
            tokens=torch.zeros(bucket, dtype=torch.long, device=device),
            positions=torch.zeros(bucket, dtype=torch.long, device=device),
            write=torch.full((bucket,), scratch, dtype=torch.long, device=device),
            starts=torch.full((bucket + 1,), scratch, dtype=torch.int32, device=device),
            used=torch.ones(bucket, dtype=torch.int32, device=device),
            cu_q=torch.arange(bucket + 1, dtype=torch.int32, device=device),
            mask=(torch.zeros(bucket, width, dtype=dtype, device=device)
                  if width and not uniform else None),
            uniform=uniform,
            max_len=self.max_len,
            cols=torch.zeros(bucket, 2, dtype=torch.int32, device=device),
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocations, autotuning)
                batch._decode_forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = batch._decode_forward(static)
        log.info("captured decode graph: batch %d, LoRA width %d", bucket, width)
        return graph, static, out
