"""Triton kernels of the fused decode step: the work between a decode step's matmuls in a
handful of launches per layer instead of a dozen.

A decode step is launch-bound at small batches (each kernel costs a few microseconds
whatever its size) and, at large ones, pays for every pass over [N, hidden] activations.
`decoding._decode_fused` runs one layer as 4 matmuls (cuBLAS; the LoRA A rows ride in the
base weight, so each also gives x Aᵀ) and these 4 kernels:

  qkv_epilogue   per (row, head): + LoRA B, Qwen3's q/k RMSNorm, RoPE; q to a buffer,
                 K and V straight into the KV arena (no separate cache write)
  attention      per (row, KV head[, split]): the group's query heads against the row's
                 keys in the arena, each key read once for the whole group; with splits,
                 a combine kernel merges the partial softmaxes
  add_norm       residual + (o or down output + LoRA B), then the next RMSNorm: per row
                 without LoRA B; with it per (row, column block), and the row's last
                 block to finish normalises the row
  silu_mul       per (row, column block): (gate + LoRA B) · SiLU times (up + LoRA B)

LoRA B per row (small steps; `decoding` adds it with an addmm in larger ones): `cols`
[N, 2] int32 holds the row's column range [lo, hi) in the LoRA table (lo = hi: no
adapter), so each row reads only its own adapter's block of B, and a batch of 8 adapters
reads no more B per row than a batch of one.

Rounding follows the eager path (`decoding._forward`): the LoRA sum and the residual are
rounded to the model's dtype where the eager path rounds them, the arithmetic in between is
fp32. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests do that);
`tl.dot` then takes fp32 operands (the interpreter mishandles bf16 ones).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BW = 32  # LoRA columns per inner step (a rank-32 adapter: one step)


def available(device: torch.device) -> bool:
    """Whether the fused decode step can run on this device: Triton, and on CUDA a GPU
    with bf16 tensor cores (compute capability 8.0, Ampere, or newer)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return INTERPRET


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _lora_half(y_row, b_ptr, b_stride, cols_ptr, n, rows, low_off, b_off,
                   BWC: tl.constexpr):
        """Σ_j y_row[low_off + j] · B[rows, b_off + j] over the row's columns [lo, hi)."""
        lo = tl.load(cols_ptr + 2 * n)
        hi = tl.load(cols_ptr + 2 * n + 1)
        acc = tl.zeros(rows.shape, dtype=tl.float32)
        for j0 in range(lo, hi, BWC):
            j = j0 + tl.arange(0, BWC)
            jm = j < hi
            low = tl.load(y_row + low_off + j, mask=jm, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + rows[:, None] * b_stride + b_off + j[None, :],
                        mask=jm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b * low[None, :], axis=1)
        return acc

    @triton.jit
    def _qkv_kernel(y_ptr, y_stride, b_ptr, b_stride, cols_ptr, qw_ptr, kw_ptr, eps,
                    cos_ptr, sin_ptr, cs_stride, q_ptr, k_ptr, v_ptr, write_ptr, write_stride,
                    HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, OUT: tl.constexpr,
                    WIDTH: tl.constexpr, LORA: tl.constexpr, NORM: tl.constexpr,
                    BWC: tl.constexpr):
        n = tl.program_id(0)
        h = tl.program_id(1)  # q heads, then k heads, then v heads: columns h·D..
        half = tl.arange(0, D // 2)
        y_row = y_ptr + n * y_stride
        c1 = h * D + half
        c2 = c1 + D // 2
        x1 = tl.load(y_row + c1).to(tl.float32)
        x2 = tl.load(y_row + c2).to(tl.float32)
        dt = q_ptr.dtype.element_ty
        member = (h >= HQ).to(tl.int32) + (h >= HQ + HK).to(tl.int32)
        if LORA:
            off = OUT + member * WIDTH
            x1 = (x1 + _lora_half(y_row, b_ptr, b_stride, cols_ptr, n, c1, off,
                                  member * WIDTH, BWC)).to(dt).to(tl.float32)
            x2 = (x2 + _lora_half(y_row, b_ptr, b_stride, cols_ptr, n, c2, off,
                                  member * WIDTH, BWC)).to(dt).to(tl.float32)
        slot = tl.load(write_ptr + n * write_stride)
        if h >= HQ + HK:  # v: stored as it is
            base = v_ptr + slot * HK * D + (h - HQ - HK) * D
            tl.store(base + half, x1.to(dt))
            tl.store(base + D // 2 + half, x2.to(dt))
        else:
            if NORM:
                if h < HQ:
                    w1 = tl.load(qw_ptr + half).to(tl.float32)
                    w2 = tl.load(qw_ptr + D // 2 + half).to(tl.float32)
                else:
                    w1 = tl.load(kw_ptr + half).to(tl.float32)
                    w2 = tl.load(kw_ptr + D // 2 + half).to(tl.float32)
                r = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
                x1 = ((x1 * r).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
                x2 = ((x2 * r).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
            cs = n * cs_stride
            cos1 = tl.load(cos_ptr + cs + half).to(tl.float32)
            cos2 = tl.load(cos_ptr + cs + D // 2 + half).to(tl.float32)
            sin1 = tl.load(sin_ptr + cs + half).to(tl.float32)
            sin2 = tl.load(sin_ptr + cs + D // 2 + half).to(tl.float32)
            r1 = x1 * cos1 - x2 * sin1  # x·cos + rotate_half(x)·sin
            r2 = x2 * cos2 + x1 * sin2
            if h < HQ:  # noqa: SIM108 (a Triton branch on a program id)
                base = q_ptr + n * HQ * D + h * D
            else:
                base = k_ptr + slot * HK * D + (h - HQ) * D
            tl.store(base + half, r1.to(dt))
            tl.store(base + D // 2 + half, r2.to(dt))

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, used_ptr, o_ptr, part_ptr, ml_ptr,
                          scale, HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr,
                          GP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                          S: tl.constexpr, F32DOT: tl.constexpr):
        n = tl.program_id(0)
        hk = tl.program_id(1)
        s = tl.program_id(2)
        start = tl.load(starts_ptr + n)
        used = tl.load(used_ptr + n)
        chunk = tl.cdiv(tl.cdiv(used, S), BT) * BT  # this row's keys, in S even pieces
        lo = s * chunk
        hi = tl.minimum(lo + chunk, used)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        heads = hk * G + g  # the query heads that share KV head hk
        live = g < G
        q = tl.load(q_ptr + n * HQ * D + heads[:, None] * D + d[None, :], mask=live[:, None],
                    other=0.0)
        if F32DOT:
            q = q.to(tl.float32)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)  # noqa: E741
        acc = tl.zeros([GP, D], dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp2
        for t0 in range(lo, hi, BT):
            t = t0 + tl.arange(0, BT)
            tm = t < hi
            rows = (start + t)[:, None] * HK * D + hk * D + d[None, :]
            k = tl.load(k_ptr + rows, mask=tm[:, None], other=0.0)
            v = tl.load(v_ptr + rows, mask=tm[:, None], other=0.0)
            if F32DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            sc = tl.dot(q, tl.trans(k)) * qk_scale  # [GP, BT]
            sc = tl.where(tm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if S == 1:
            out = acc / l[:, None]
            tl.store(o_ptr + n * HQ * D + heads[:, None] * D + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=live[:, None])
        else:  # unnormalised partials [N, HQ, S, D] and (max, sum) [N, HQ, S, 2]
            at = (n * HQ + heads) * S + s
            tl.store(part_ptr + at[:, None] * D + d[None, :], acc, mask=live[:, None])
            tl.store(ml_ptr + at * 2, m, mask=live)
            tl.store(ml_ptr + at * 2 + 1, l, mask=live)

    @triton.jit
    def _combine_kernel(part_ptr, ml_ptr, o_ptr, S: tl.constexpr, SP: tl.constexpr,
                        D: tl.constexpr):
        row = tl.program_id(0)  # n · HQ + head
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        sm = s < S
        m = tl.load(ml_ptr + (row * S + s) * 2, mask=sm, other=float("-inf"))
        l = tl.load(ml_ptr + (row * S + s) * 2 + 1, mask=sm, other=0.0)  # noqa: E741
        top = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp2(m - top), 0.0)
        acc = tl.load(part_ptr + (row * S + s)[:, None] * D + d[None, :], mask=sm[:, None],
                      other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(o_ptr + row * D + d, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _add_norm_kernel(y_ptr, y_stride, h_ptr, w_ptr, x_ptr, eps, H: tl.constexpr,
                         BC: tl.constexpr):
        """One program per row: residual + y, then the row's RMSNorm."""
        n = tl.program_id(0)
        y_row = y_ptr + n * y_stride
        dt = h_ptr.dtype.element_ty
        ss = tl.zeros([BC], dtype=tl.float32)
        for c0 in range(0, H, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < H
            s = (tl.load(h_ptr + n * H + c, mask=cm, other=0.0).to(tl.float32)
                 + tl.load(y_row + c, mask=cm, other=0.0).to(tl.float32)).to(dt)
            tl.store(h_ptr + n * H + c, s, mask=cm)
            sf = s.to(tl.float32)
            ss += sf * sf
        r = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)
        tl.debug_barrier()  # the stores above are read back by other threads
        for c0 in range(0, H, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < H
            s = tl.load(h_ptr + n * H + c, mask=cm, other=0.0).to(tl.float32)
            x = (s * r).to(dt).to(tl.float32) * tl.load(w_ptr + c, mask=cm, other=0.0).to(
                tl.float32)
            tl.store(x_ptr + n * H + c, x.to(dt), mask=cm)

    @triton.jit
    def _add_norm_lora_kernel(y_ptr, y_stride, b_ptr, b_stride, cols_ptr, h_ptr, w_ptr, x_ptr,
                              eps, part_ptr, count_ptr, H: tl.constexpr, NB: tl.constexpr,
                              NBP: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
                              BWC: tl.constexpr):
        """Column blocks of a row add their part (with LoRA B) to the residual and store
        their sum of squares; the row's last block to finish normalises the whole row."""
        n = tl.program_id(0)
        blk = tl.program_id(1)
        y_row = y_ptr + n * y_stride
        dt = h_ptr.dtype.element_ty
        c = blk * BC + tl.arange(0, BC)
        cm = c < H
        rows = tl.where(cm, c, 0)
        delta = tl.load(y_row + c, mask=cm, other=0.0).to(tl.float32)
        delta += _lora_half(y_row, b_ptr, b_stride, cols_ptr, n, rows, H, 0, BWC)
        s = (tl.load(h_ptr + n * H + c, mask=cm, other=0.0).to(tl.float32)
             + delta.to(dt).to(tl.float32)).to(dt)
        tl.store(h_ptr + n * H + c, s, mask=cm)
        sf = tl.where(cm, s.to(tl.float32), 0.0)
        tl.store(part_ptr + n * NB + blk, tl.sum(sf * sf, axis=0))
        tl.debug_barrier()  # every thread's stores before the (releasing) ticket
        ticket = tl.atomic_add(count_ptr + n, 1)  # acq_rel: the last sees all the others'
        if ticket == NB - 1:
            b = tl.arange(0, NBP)
            parts = tl.load(part_ptr + n * NB + b, mask=b < NB, other=0.0, cache_modifier=".cg")
            r = tl.rsqrt(tl.sum(parts, axis=0) / H + eps)  # (summed in block order)
            for c0 in range(0, H, BH):
                cc = c0 + tl.arange(0, BH)
                m = cc < H
                sv = tl.load(h_ptr + n * H + cc, mask=m, other=0.0, cache_modifier=".cg")
                xv = (sv.to(tl.float32) * r).to(dt).to(tl.float32) * tl.load(
                    w_ptr + cc, mask=m, other=0.0).to(tl.float32)
                tl.store(x_ptr + n * H + cc, xv.to(dt), mask=m)
            tl.atomic_xchg(count_ptr + n, 0)  # ready for the next call

    @triton.jit
    def _silu_mul_kernel(y_ptr, y_stride, b_ptr, b_stride, cols_ptr, out_ptr,
                         INTER: tl.constexpr, WIDTH: tl.constexpr, LORA: tl.constexpr,
                         BC: tl.constexpr, BWC: tl.constexpr):
        n = tl.program_id(0)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        cm = c < INTER
        c = tl.where(cm, c, 0)
        y_row = y_ptr + n * y_stride
        dt = out_ptr.dtype.element_ty
        gate = tl.load(y_row + c).to(tl.float32)
        up = tl.load(y_row + INTER + c).to(tl.float32)
        if LORA:
            gate += _lora_half(y_row, b_ptr, b_stride, cols_ptr, n, c, 2 * INTER, 0, BWC)
            up += _lora_half(y_row, b_ptr, b_stride, cols_ptr, n, INTER + c,
                             2 * INTER + WIDTH, WIDTH, BWC)
        gate = gate.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32) * up
        tl.store(out_ptr + n * INTER + c, act.to(dt), mask=cm)


# --- launchers ----------------------------------------------------------------------------
def qkv_epilogue(y: torch.Tensor, B: torch.Tensor | None, cols: torch.Tensor,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, write: torch.Tensor, heads: int) -> torch.Tensor:
    """y [N, (Hq + 2 Hk)·D (+ 3 W)] from the fused q/k/v matmul -> q [N, Hq, D]; K and V
    go to the caches [slots, Hk, D] at rows `write` [N]."""
    n = y.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    out = (heads + 2 * kv_heads) * dim
    q = torch.empty(n, heads, dim, dtype=k_cache.dtype, device=y.device)
    width = B.shape[1] // 3 if B is not None else 0
    norm = q_norm is not None and k_norm is not None
    _qkv_kernel[(n, heads + 2 * kv_heads)](
        y, y.stride(0), B if B is not None else y, B.stride(0) if B is not None else 0, cols,
        q_norm if norm else y, k_norm if norm else y, eps, cos, sin, cos.stride(0), q,
        k_cache, v_cache, write, write.stride(0), HQ=heads, HK=kv_heads, D=dim, OUT=out,
        WIDTH=width, LORA=B is not None, NORM=norm, BWC=BW, num_warps=4)
    return q


def splits(rows: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Pieces each row's keys are cut into, so that small batches still fill the GPU
    (about 2 programs per SM) without pieces shorter than 64 keys."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 132)
    want = -(-2 * sms // (rows * kv_heads))
    return max(1, min(want, 16, max_len // 64))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              starts: torch.Tensor, used: torch.Tensor, scale: float, n_splits: int
              ) -> torch.Tensor:
    """q [N, Hq, D] against each row's `used` keys from `starts` in the caches -> [N, Hq, D].
    (Every row is the newest token of its sequence: it sees all of its keys.)"""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if n_splits > 1:
        part = torch.empty(n, heads, n_splits, dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(n, heads, n_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    _attention_kernel[(n, kv_heads, n_splits)](
        q, k_cache, v_cache, starts, used, out, part, ml, scale, HQ=heads, HK=kv_heads,
        G=group, GP=max(16, _pow2(group)), D=dim, BT=32 if n_splits > 1 else 64,
        S=n_splits, F32DOT=INTERPRET or q.dtype == torch.float32, num_warps=4)
    if n_splits > 1:
        _combine_kernel[(n * heads,)](part, ml, out, S=n_splits, SP=max(2, _pow2(n_splits)),
                                      D=dim, num_warps=4)
    return out


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Per-row tickets of `add_norm`'s last-block pattern: zeros, and left at zero by every
    call, so one buffer serves every call (and every captured graph) on the device. A
    larger one is added when needed; none is ever freed (a captured graph may use it)."""
    have = _COUNTERS.setdefault(device, [])
    if not have or have[-1].numel() < n:
        have.append(torch.zeros(max(n, 256), dtype=torch.int32, device=device))
    return have[-1]


def add_norm(y: torch.Tensor, B: torch.Tensor | None, cols: torch.Tensor, h: torch.Tensor,
             weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += y[:, :H] (+ LoRA B of y[:, H:]) in place; returns RMSNorm(h) · weight.
    Without LoRA one program per row; with it (small batches) the columns spread over
    programs, which each read their block of B, and a row's last program normalises."""
    n, hidden = h.shape
    x = torch.empty_like(h)
    if B is None:
        bc = min(_pow2(hidden), 1024)
        _add_norm_kernel[(n,)](y, y.stride(0), h, weight, x, eps, H=hidden, BC=bc,
                               num_warps=8 if bc >= 1024 else 4)
        return x
    bc = 128
    blocks = math.ceil(hidden / bc)
    part = torch.empty(n, blocks, dtype=torch.float32, device=h.device)
    _add_norm_lora_kernel[(n, blocks)](
        y, y.stride(0), B, B.stride(0), cols, h, weight, x, eps, part,
        _counters(n, h.device), H=hidden, NB=blocks, NBP=max(2, _pow2(blocks)), BC=bc,
        BH=min(_pow2(hidden), 1024), BWC=BW, num_warps=4)
    return x


def silu_mul(y: torch.Tensor, B: torch.Tensor | None, cols: torch.Tensor, inter: int
             ) -> torch.Tensor:
    """y [N, 2I (+ 2W)] from the fused gate/up matmul -> SiLU(gate) · up [N, I]."""
    n = y.shape[0]
    out = torch.empty(n, inter, dtype=y.dtype, device=y.device)
    width = B.shape[1] // 2 if B is not None else 0
    bc = 64 if B is not None else 512  # with LoRA: more programs, each a smaller block of B
    _silu_mul_kernel[(n, math.ceil(inter / bc))](
        y, y.stride(0), B if B is not None else y, B.stride(0) if B is not None else 0, cols,
        out, INTER=inter, WIDTH=width, LORA=B is not None, BC=bc, BWC=BW, num_warps=4)
    return out
