"""The fused decode step's kernels after its matmuls (decode_kernels tells the design):
qkv_epilogue after q/k/v, add_norm after o and after down, silu_mul after gate/up.

LoRA B in the kernels (where `decoding.RunningBatch.lora_path_for` puts it; else `forward`
adds it with an addmm per group): `cols` [N, 2] int32 holds each row's column range
[lo, hi) in the LoRA table (lo = hi: no adapter). A program takes one row (a GEMV over its
adapter's block of B) or a block of 16 rows (tensor-core dots over the columns of the
block's adapters, each row's others masked off, each block of B read once per block).

Rounding follows the eager path (`forward.forward`): the LoRA sum and the residual are
rounded to the model's dtype where the eager path rounds them, the arithmetic in between is
fp32.
"""

from __future__ import annotations

import math

import torch

from workers.sampling import kv_cache
from workers.sampling.decode_kernels import INTERPRET, pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

BW = 32  # LoRA columns per inner step (a rank-32 adapter: one step)


if triton is not None:

    @triton.jit
    def _lora_rows(y_ptr, y_stride, ns, nm, b_ptr, b_stride, cols_ptr, outc, low_off, b_off,
                   BM: tl.constexpr, BC: tl.constexpr, BWC: tl.constexpr, DOT: tl.constexpr,
                   F32DOT: tl.constexpr):
        """[BM, BC]: Σ_j y[n, low_off + j] · B[outc, b_off + j] over each row n's columns
        [lo, hi) (rows `ns`, live where `nm`). The loop spans the union of the rows' ranges;
        a row's other columns are masked off. DOT: tensor-core dots over the block of rows
        (B read once per block); else (a block of one row) a multiply-and-sum."""
        lo = tl.load(cols_ptr + 2 * ns, mask=nm, other=0)
        hi = tl.load(cols_ptr + 2 * ns + 1, mask=nm, other=0)
        first = tl.min(tl.where(hi > lo, lo, 1 << 30), axis=0)
        last = tl.max(hi, axis=0)
        acc = tl.zeros([BM, BC], dtype=tl.float32)
        for j0 in range(first, last, BWC):
            j = j0 + tl.arange(0, BWC)
            take = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
            low = tl.load(y_ptr + ns[:, None] * y_stride + low_off + j[None, :], mask=take,
                          other=0.0)
            b = tl.load(b_ptr + outc[:, None] * b_stride + b_off + j[None, :],
                        mask=(j < last)[None, :], other=0.0)
            if DOT:
                if F32DOT:  # IEEE: Triton's default for fp32 dots is TF32
                    acc += tl.dot(low.to(tl.float32), tl.trans(b.to(tl.float32)),
                                  input_precision="ieee")
                else:
                    acc += tl.dot(low, tl.trans(b))
            else:
                acc += tl.sum(low.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :],
                              axis=2)
        return acc

    @triton.jit
    def _qkv_kernel(y_ptr, y_stride, b_ptr, b_stride, cols_ptr, qw_ptr, kw_ptr, eps,
                    cos_ptr, sin_ptr, cs_stride, q_ptr, k_ptr, v_ptr, write_ptr, write_stride,
                    N, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, OUT: tl.constexpr,
                    WIDTH: tl.constexpr, LORA: tl.constexpr, NORM: tl.constexpr,
                    BM: tl.constexpr, BWC: tl.constexpr, DOT: tl.constexpr,
                    F32DOT: tl.constexpr):
        ns = tl.program_id(0) * BM + tl.arange(0, BM)
        nm = ns < N
        live = nm[:, None]
        h = tl.program_id(1)  # q heads, then k heads, then v heads: columns h·D..
        half = tl.arange(0, D // 2)
        c1 = h * D + half
        c2 = c1 + D // 2
        y_rows = y_ptr + ns[:, None] * y_stride
        x1 = tl.load(y_rows + c1[None, :], mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(y_rows + c2[None, :], mask=live, other=0.0).to(tl.float32)
        dt = q_ptr.dtype.element_ty
        member = (h >= HQ).to(tl.int32) + (h >= HQ + HK).to(tl.int32)
        if LORA:
            off = OUT + member * WIDTH
            x1 = (x1 + _lora_rows(y_ptr, y_stride, ns, nm, b_ptr, b_stride, cols_ptr, c1, off,
                                  member * WIDTH, BM, D // 2, BWC, DOT, F32DOT)
                  ).to(dt).to(tl.float32)
            x2 = (x2 + _lora_rows(y_ptr, y_stride, ns, nm, b_ptr, b_stride, cols_ptr, c2, off,
                                  member * WIDTH, BM, D // 2, BWC, DOT, F32DOT)
                  ).to(dt).to(tl.float32)
        slot = tl.load(write_ptr + ns * write_stride, mask=nm, other=0).to(tl.int64)
        if h >= HQ + HK:  # v: stored as it is
            base = v_ptr + slot[:, None] * HK * D + (h - HQ - HK) * D
            kv = v_ptr.dtype.element_ty  # (the model's dtype, or float8: rounded from it)
            tl.store(base + half[None, :], x1.to(dt).to(kv), mask=live)
            tl.store(base + D // 2 + half[None, :], x2.to(dt).to(kv), mask=live)
        else:
            if NORM:
                if h < HQ:
                    w1 = tl.load(qw_ptr + half).to(tl.float32)
                    w2 = tl.load(qw_ptr + D // 2 + half).to(tl.float32)
                else:
                    w1 = tl.load(kw_ptr + half).to(tl.float32)
                    w2 = tl.load(kw_ptr + D // 2 + half).to(tl.float32)
                r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
                x1 = ((x1 * r[:, None]).to(dt).to(tl.float32) * w1[None, :]).to(dt).to(
                    tl.float32)
                x2 = ((x2 * r[:, None]).to(dt).to(tl.float32) * w2[None, :]).to(dt).to(
                    tl.float32)
            cs = ns[:, None] * cs_stride + half[None, :]
            cos1 = tl.load(cos_ptr + cs, mask=live, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_ptr + cs + D // 2, mask=live, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_ptr + cs, mask=live, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_ptr + cs + D // 2, mask=live, other=0.0).to(tl.float32)
            r1 = x1 * cos1 - x2 * sin1  # x·cos + rotate_half(x)·sin
            r2 = x2 * cos2 + x1 * sin2
            if h < HQ:
                base = q_ptr + ns[:, None] * HQ * D + h * D
                tl.store(base + half[None, :], r1.to(dt), mask=live)
                tl.store(base + D // 2 + half[None, :], r2.to(dt), mask=live)
            else:
                kt = k_ptr.dtype.element_ty
                base = k_ptr + slot[:, None] * HK * D + (h - HQ) * D
                tl.store(base + half[None, :], r1.to(dt).to(kt), mask=live)
                tl.store(base + D // 2 + half[None, :], r2.to(dt).to(kt), mask=live)

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
                              eps, part_ptr, count_ptr, N, H: tl.constexpr, NB: tl.constexpr,
                              NBP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                              BH: tl.constexpr, BWC: tl.constexpr, DOT: tl.constexpr,
                              F32DOT: tl.constexpr):
        """Column blocks of a block of rows add their part (with LoRA B) to the residual and
        store their sums of squares; the last column block to finish normalises the rows."""
        rb = tl.program_id(0)
        blk = tl.program_id(1)
        ns = rb * BM + tl.arange(0, BM)
        nm = ns < N
        dt = h_ptr.dtype.element_ty
        c = blk * BC + tl.arange(0, BC)
        cm = c < H
        live = nm[:, None] & cm[None, :]
        outc = tl.where(cm, c, 0)
        at = ns[:, None] * H + c[None, :]
        delta = tl.load(y_ptr + ns[:, None] * y_stride + c[None, :], mask=live,
                        other=0.0).to(tl.float32)
        delta += _lora_rows(y_ptr, y_stride, ns, nm, b_ptr, b_stride, cols_ptr, outc, H, 0,
                            BM, BC, BWC, DOT, F32DOT)
        s = (tl.load(h_ptr + at, mask=live, other=0.0).to(tl.float32)
             + delta.to(dt).to(tl.float32)).to(dt)
        tl.store(h_ptr + at, s, mask=live)
        sf = tl.where(live, s.to(tl.float32), 0.0)
        tl.store(part_ptr + ns * NB + blk, tl.sum(sf * sf, axis=1), mask=nm)
        tl.debug_barrier()  # every thread's stores before the (releasing) ticket
        ticket = tl.atomic_add(count_ptr + rb, 1)  # acq_rel: the last sees all the others'
        if ticket == NB - 1:
            b = tl.arange(0, NBP)
            parts = tl.load(part_ptr + ns[:, None] * NB + b[None, :],
                            mask=nm[:, None] & (b < NB)[None, :], other=0.0, cache_modifier=".cg")
            r = tl.rsqrt(tl.sum(parts, axis=1) / H + eps)  # (summed in block order)
            for c0 in range(0, H, BH):
                cc = c0 + tl.arange(0, BH)
                m = nm[:, None] & (cc < H)[None, :]
                sv = tl.load(h_ptr + ns[:, None] * H + cc[None, :], mask=m, other=0.0,
                             cache_modifier=".cg")
                xv = (sv.to(tl.float32) * r[:, None]).to(dt).to(tl.float32) * tl.load(
                    w_ptr + cc, mask=cc < H, other=0.0).to(tl.float32)[None, :]
                tl.store(x_ptr + ns[:, None] * H + cc[None, :], xv.to(dt), mask=m)
            tl.atomic_xchg(count_ptr + rb, 0)  # ready for the next call

    @triton.jit
    def _silu_mul_kernel(y_ptr, y_stride, b_ptr, b_stride, cols_ptr, out_ptr, N,
                         INTER: tl.constexpr, WIDTH: tl.constexpr, LORA: tl.constexpr,
                         BM: tl.constexpr, BC: tl.constexpr, BWC: tl.constexpr,
                         DOT: tl.constexpr, F32DOT: tl.constexpr):
        ns = tl.program_id(0) * BM + tl.arange(0, BM)
        nm = ns < N
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        cm = c < INTER
        c = tl.where(cm, c, 0)
        live = nm[:, None] & cm[None, :]
        y_rows = y_ptr + ns[:, None] * y_stride
        dt = out_ptr.dtype.element_ty
        gate = tl.load(y_rows + c[None, :], mask=live, other=0.0).to(tl.float32)
        up = tl.load(y_rows + INTER + c[None, :], mask=live, other=0.0).to(tl.float32)
        if LORA:
            gate += _lora_rows(y_ptr, y_stride, ns, nm, b_ptr, b_stride, cols_ptr, c,
                               2 * INTER, 0, BM, BC, BWC, DOT, F32DOT)
            up += _lora_rows(y_ptr, y_stride, ns, nm, b_ptr, b_stride, cols_ptr, INTER + c,
                             2 * INTER + WIDTH, WIDTH, BM, BC, BWC, DOT, F32DOT)
        gate = gate.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32) * up
        tl.store(out_ptr + ns[:, None] * INTER + c[None, :], act.to(dt), mask=live)


# --- launchers ----------------------------------------------------------------------------
def _dots(rows: int, dtype: torch.dtype) -> dict:
    """The LoRA arguments of a launch with `rows` rows per program: tensor-core dots from
    16 rows up (fp32 operands under the interpreter, or for an fp32 model)."""
    return dict(BM=rows, DOT=rows >= 16, F32DOT=INTERPRET or dtype == torch.float32)


def qkv_epilogue(y: torch.Tensor, B: torch.Tensor | None, cols: torch.Tensor,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, write: torch.Tensor, heads: int, rows: int = 1,
                 config: tuple[int, int] | None = None) -> torch.Tensor:
    """y [N, (Hq + 2 Hk)·D (+ 3 W)] from the fused q/k/v matmul -> q [N, Hq, D]; K and V
    go to the caches [slots, Hk, D] at rows `write` [N] (rounded to the caches' dtype).
    `rows` per program: 1, or 16 and up (LoRA B by tensor-core dots); `config`: (warps,
    pipeline stages)."""
    n = y.shape[0]
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    out = (heads + 2 * kv_heads) * dim
    q = torch.empty(n, heads, dim, dtype=y.dtype, device=y.device)
    width = B.shape[1] // 3 if B is not None else 0
    norm = q_norm is not None and k_norm is not None
    warps, stages = config or (4, 3)
    caches = k_cache, v_cache
    if INTERPRET and k_cache.element_size() == 1:
        # Triton's interpreter rounds to float8 wrongly (some values land a binade low):
        # the kernel writes the model's dtype, torch rounds and stores
        k_cache, v_cache = (torch.empty(n, kv_heads, dim, dtype=y.dtype) for _ in caches)
        write, rounded_at = torch.arange(n), write
    _qkv_kernel[(math.ceil(n / rows), heads + 2 * kv_heads)](
        y, y.stride(0), B if B is not None else y, B.stride(0) if B is not None else 0, cols,
        q_norm if norm else y, k_norm if norm else y, eps, cos, sin, cos.stride(0), q,
        k_cache, v_cache, write, write.stride(0), n, HQ=heads, HK=kv_heads, D=dim, OUT=out,
        WIDTH=width, LORA=B is not None, NORM=norm, BWC=BW, **_dots(rows, y.dtype),
        num_warps=warps, num_stages=stages)
    if caches[0] is not k_cache:
        for cache, new in zip(caches, (k_cache, v_cache), strict=True):
            kv_cache.store(cache, rounded_at, new)
    return q


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Tickets of `add_norm`'s last-block pattern (one per row or block of rows): zeros,
    and left at zero by every call, so one buffer serves every call (and every captured
    graph) on the device. A larger one is added when needed; none is ever freed (a
    captured graph may use it)."""
    have = _COUNTERS.setdefault(device, [])
    if not have or have[-1].numel() < n:
        have.append(torch.zeros(max(n, 256), dtype=torch.int32, device=device))
    return have[-1]


def add_norm(y: torch.Tensor, B: torch.Tensor | None, cols: torch.Tensor, h: torch.Tensor,
             weight: torch.Tensor, eps: float, rows: int = 1,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """h += y[:, :H] (+ LoRA B of y[:, H:]) in place; returns RMSNorm(h) · weight.
    Without LoRA one program per row; with it the columns spread over programs of `rows`
    rows, which each read their block of B, and a block's last program normalises it.
    `config` (with LoRA): (columns per program, warps, pipeline stages)."""
    n, hidden = h.shape
    x = torch.empty_like(h)
    if B is None:
        bc = min(pow2(hidden), 1024)
        _add_norm_kernel[(n,)](y, y.stride(0), h, weight, x, eps, H=hidden, BC=bc,
                               num_warps=8 if bc >= 1024 else 4)
        return x
    if config is None:  # (blocks of rows: the best of benchmarks.decode_kernels's sweep)
        config = (128, 4, 3) if rows == 1 else (128, 8, 2)
    bc, warps, stages = config
    blocks = math.ceil(hidden / bc)
    part = torch.empty(n, blocks, dtype=torch.float32, device=h.device)
    _add_norm_lora_kernel[(math.ceil(n / rows), blocks)](
        y, y.stride(0), B, B.stride(0), cols, h, weight, x, eps, part,
        _counters(n, h.device), n, H=hidden, NB=blocks, NBP=max(2, pow2(blocks)), BC=bc,
        BH=min(pow2(hidden), 1024 if rows == 1 else 256), BWC=BW, **_dots(rows, y.dtype),
        num_warps=warps, num_stages=stages)
    return x


def silu_mul(y: torch.Tensor, B: torch.Tensor | None, cols: torch.Tensor, inter: int,
             rows: int = 1, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y [N, 2I (+ 2W)] from the fused gate/up matmul -> SiLU(gate) · up [N, I].
    `config`: (columns per program, warps, pipeline stages)."""
    n = y.shape[0]
    out = torch.empty(n, inter, dtype=y.dtype, device=y.device)
    width = B.shape[1] // 2 if B is not None else 0
    if config is None:  # with LoRA: more programs, each a smaller block of B; blocks of
        # rows: the best of benchmarks.decode_kernels's sweep
        config = (512 if B is None else 64, 4, 3) if rows == 1 else (32, 4, 2)
    bc, warps, stages = config
    _silu_mul_kernel[(math.ceil(n / rows), math.ceil(inter / bc))](
        y, y.stride(0), B if B is not None else y, B.stride(0) if B is not None else 0, cols,
        out, n, INTER=inter, WIDTH=width, LORA=B is not None, BC=bc, BWC=BW,
        **_dots(rows, y.dtype), num_warps=warps, num_stages=stages)
    return out
