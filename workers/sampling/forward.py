"""The running batch's forward passes through the base model + the LoRA table (lora_table):
`forward` (prefill, and the unfused decode step in `decode_unfused`) and the fused decode
step `decode_fused`.

The decode step on CUDA is fused (`decode_fused`, kernels in epilogue_kernels,
attention_kernels and gemv_kernel; decode_kernels tells their design): per layer 4 matmuls
and 4 Triton kernels that carry LoRA B (where `RunningBatch.lora_path_for` puts it), the
norms, RoPE, the K/V write into the cache, grouped-query attention over its blocks and SiLU;
steps of a few rows do their large projections with gemv_kernel.gemv. Its sampling (without
top-k / top-p) runs in sample_kernels. `fused=False` (and the CPU by default) runs the
unfused step, `forward` with eager glue, and the compiled `choose`: the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from workers.model import LoraModel
from workers.parallel import tp
from workers.sampling import attention_kernels, epilogue_kernels, gemv_kernel
from workers.sampling.graphs import DecodeInputs
from workers.sampling.kv_cache import BLOCK, KVCache, slots
from workers.sampling.lora_table import LoraTable
from workers.training import fastpath

# Fused steps of at most this many rows do their large projections (weights of at least
# GEMV_MIN_BYTES, K at most GEMV_MAX_K) with gemv_kernel.gemv, which read them faster
# than cuBLAS (4B's q/k/v, o and gate/up on an H100: 13.7 / 11.0 / 36.1 µs against
# 14.4 / 11.7 / 39.5, `benchmarks.decode_kernels`). Not 0.6B's, where both take about
# 5.5 µs, a launch's worth, nor a long K (4B's down: a program per 32 columns streams all of
# K alone; cuBLAS splits K), 23.4 against 21.7.
GEMV_ROWS = 8
GEMV_MIN_BYTES = 16 << 20
GEMV_MAX_K = 4096

# Where the fused step adds LoRA B (`lora_path`, unless RunningBatch.lora_path says;
# measured on an H100 with `benchmarks.sampler --lora-placement`): inside the kernels a row
# per program ("gemv": each row reads only its adapter's B) in steps of at most
# LORA_GEMV_ROWS rows, or of at most MIXED_GEMV_ROWS when the rows use several adapters;
# larger steps of one adapter with an addmm per projection group ("addmm": B read once);
# larger mixed ones inside the kernels 16 rows per program ("dots": tensor-core dots over
# the adapters of each block of rows, which the running batch groups by adapter), where
# the addmm would read every adapter's B and mask the rows first.
LORA_GEMV_ROWS = 8
MIXED_GEMV_ROWS = 32


def lora_path(rows: int, several: bool) -> str:
    """Where a fused step of `rows` rows adds LoRA B; `several`: its rows use more than one
    adapter (or some none)."""
    if rows <= LORA_GEMV_ROWS or (several and rows <= MIXED_GEMV_ROWS):
        return "gemv"
    return "dots" if several else "addmm"


def _group(model: LoraModel, lora: LoraTable, group: str, x: torch.Tensor,
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


def forward(model: LoraModel, lora: LoraTable, tokens: torch.Tensor, positions: torch.Tensor,
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


def _row_masks(lora: LoraTable, mask: torch.Tensor | None, uniform: bool,
               members: tuple[int, ...] = (1, 2, 3)) -> dict[int, torch.Tensor] | None:
    """`_group`'s masks: per number of group members n, the rows' [N, n·R] column masks;
    {} when every row uses the table's one adapter; None without LoRA."""
    if uniform and lora.width:
        return {}
    return None if mask is None else {n: mask.repeat(1, n) for n in members}


def _matmul(model: LoraModel, lora: LoraTable, group: str, x: torch.Tensor,
            masks: dict[int, torch.Tensor] | None, gemv: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection group's output for the fused step, and the B its kernel still has to
    apply (None: nothing left). With `masks` that is `_group`'s output (LoRA B added by an
    addmm); else y = [base output | x Aᵀ] (summed over ranks when the group is
    row-parallel) and the group's B (None without LoRA). `gemv`: the matmul by
    gemv_kernel.gemv (steps of a few rows)."""
    if masks is not None:
        return _group(model, lora, group, x, masks), None
    wide = group in lora.wide
    weight, bias = (lora.wide[group] if wide
                    else model._fused_groups[group])  # type: ignore[attr-defined]
    gemv = gemv and bias is None and (weight.numel() * weight.element_size() >= GEMV_MIN_BYTES
                                      and weight.shape[1] <= GEMV_MAX_K)
    y = gemv_kernel.gemv(x, weight) if gemv else None
    if y is None:
        y = F.linear(x, weight, bias)
    if lora.styles[group] == "row":
        y = tp.reduce_from(y, model.tp)
    return y, lora.B[group] if wide else None


def decode_unfused(model: LoraModel, lora: LoraTable, x: DecodeInputs, cache: KVCache
                   ) -> torch.Tensor:
    """One decode step, tokens [N] -> logits [N, V], as `forward` with eager glue: each row's
    K/V into the cache, then attention over its blocks (the Triton kernel where it runs,
    else SDPA per row on the CPU, or over the rows' keys gathered and padded on CUDA)."""
    write = x.write_slots()
    kernel = x.tokens.is_cuda and attention_kernels.usable(model.config)
    if not x.tokens.is_cuda:  # per-row attention: each row's key slots
        rows = [slots(t, 0, u) for t, u in zip(x.table.tolist(), x.used.tolist(), strict=True)]

    def attend(i, q, k, v, scale):
        cache.write(i, write, k, v)
        if kernel:
            splits = attention_kernels.splits(q.shape[0], k.shape[1], x.max_len, q.device)
            return attention_kernels.attention(q, cache.k[i], cache.v[i], x.table, x.used,
                                               scale, splits)
        if q.is_cuda:
            return _padded_attention(q, cache.k[i], cache.v[i], x, scale)
        out = []
        for b, at in enumerate(rows):
            kk, vv = cache.k[i][at].to(q.dtype), cache.v[i][at].to(q.dtype)
            groups = q.shape[1] // kk.shape[1]
            kk, vv = kk.repeat_interleave(groups, 1), vv.repeat_interleave(groups, 1)
            out.append(F.scaled_dot_product_attention(
                q[b : b + 1].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                scale=scale).transpose(0, 1))
        return torch.cat(out)

    return forward(model, lora, x.tokens, x.positions, x.mask, attend, uniform=x.uniform)


def _padded_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      x: DecodeInputs, scale: float) -> torch.Tensor:
    """Attention of each row over its keys, gathered to [N, max_len] and masked past `used`
    (CUDA models whose heads the Triton kernel does not take; graph-safe: no host reads)."""
    t = torch.arange(x.max_len, device=q.device)
    at = x.table[:, t // BLOCK].long() * BLOCK + t % BLOCK  # [N, L]
    groups = q.shape[1] // k_cache.shape[1]
    k = k_cache[at].to(q.dtype).repeat_interleave(groups, 2).transpose(1, 2)  # [N, H, L, D]
    v = v_cache[at].to(q.dtype).repeat_interleave(groups, 2).transpose(1, 2)
    mask = (t[None, :] < x.used[:, None])[:, None, None, :]  # [N, 1, 1, L]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                          scale=scale)[:, :, 0]


def decode_fused(model: LoraModel, lora: LoraTable, x: DecodeInputs, cache: KVCache,
                 path: str = "gemv") -> torch.Tensor:
    """One decode step, tokens [N] -> logits [N, V], as 4 matmuls and 4 Triton kernels per
    layer (epilogue_kernels, attention_kernels): LoRA B, norms, RoPE, the K/V write and SiLU
    ride in the kernels between the matmuls. The same arithmetic as `forward`, fewer
    launches. `path`: where LoRA B is added (`RunningBatch.lora_path_for`)."""
    ak, ek, body = attention_kernels, epilogue_kernels, model.hf.model
    h = body.embed_tokens(x.tokens)  # [N, hidden], the residual stream (updated in place)
    cos, sin = body.rotary_emb(h[None], x.positions[None])
    cos, sin, n = cos[0], sin[0], h.shape[0]
    layers, kv_heads = body.layers, cache.k[0].shape[1]
    write = x.write_slots()
    splits = ak.splits(n, kv_heads, x.max_len, h.device)
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
        q = ek.qkv_epilogue(y, B, x.cols, None if qn is None else qn.weight,
                            None if kn is None else kn.weight,
                            0.0 if qn is None else qn.variance_epsilon, cos, sin, cache.k[i],
                            cache.v[i], write, attn.q_proj.out_features // attn.head_dim,
                            rows)
        o = ak.attention(q, cache.k[i], cache.v[i], x.table, x.used, attn.scaling, splits)
        y, B = _matmul(model, lora, p + "o", o.view(n, -1), layer_masks, gemv)
        ln = layer.post_attention_layernorm
        xin = ek.add_norm(y, B, x.cols, h, ln.weight, ln.variance_epsilon, rows)
        y, B = _matmul(model, lora, p + "gate_up", xin, layer_masks, gemv)
        act = ek.silu_mul(y, B, x.cols, layer.mlp.gate_proj.out_features, rows)
        y, B = _matmul(model, lora, p + "down", act, layer_masks, gemv)
        ln = layers[i + 1].input_layernorm if i + 1 < len(layers) else body.norm
        xin = ek.add_norm(y, B, x.cols, h, ln.weight, ln.variance_epsilon, rows)
    return _group(model, lora, "lm_head", xin, masks)
