"""The fused decode step's attention over the paged KV cache (decode_kernels tells the
design): per (row, KV head[, split]) the group's query heads against the row's keys, found
through its block table (kv_cache), each key read once for the whole group; with splits
(`splits`), a combine kernel merges the partial softmaxes.
"""

from __future__ import annotations

import functools

import torch

from workers.sampling import decode_kernels
from workers.sampling.decode_kernels import INTERPRET, pow2
from workers.sampling.kv_cache import BLOCK

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

PROGRAMS_PER_SM = 2  # attention programs the splits aim for
SHARED_SLACK = 32 * 1024  # shared memory a program needs beside its K/V tiles


if triton is not None:

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, used_ptr, o_ptr, part_ptr, ml_ptr,
                          scale, TW, PAGE: tl.constexpr, HQ: tl.constexpr,
                          HK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                          D: tl.constexpr, BT: tl.constexpr, S: tl.constexpr,
                          F32DOT: tl.constexpr):
        n = tl.program_id(0)
        hk = tl.program_id(1)
        s = tl.program_id(2)
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
            block = tl.load(table_ptr + n * TW + t // PAGE, mask=tm, other=0)  # each key's
            slot = block.to(tl.int64) * PAGE + t % PAGE  # offsets pass 2**31 elements
            rows = slot[:, None] * HK * D + hk * D + d[None, :]
            k = tl.load(k_ptr + rows, mask=tm[:, None], other=0.0).to(q_ptr.dtype.element_ty)
            v = tl.load(v_ptr + rows, mask=tm[:, None], other=0.0).to(q_ptr.dtype.element_ty)
            if F32DOT:  # fp32 dots in IEEE precision: Triton's default for fp32 is TF32
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                sc = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [GP, BT]
            else:
                sc = tl.dot(q, tl.trans(k)) * qk_scale
            sc = tl.where(tm[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
            if F32DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
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


# --- launchers ----------------------------------------------------------------------------
def splits(rows: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """Pieces each row's keys are cut into, so that small batches still fill the GPU
    (about PROGRAMS_PER_SM programs per SM) without pieces shorter than 64 keys."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 132)
    want = -(-PROGRAMS_PER_SM * sms // (rows * kv_heads))
    return max(1, min(want, 16, max_len // 64))


@functools.cache
def _shared_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 227 * 1024  # the interpreter: as on Hopper
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def usable(config) -> bool:
    """Whether the kernel takes this model's heads on CUDA (the unfused step's attention)."""
    return triton is not None and decode_kernels.unsupported(config) is None


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              table: torch.Tensor, used: torch.Tensor, scale: float, n_splits: int,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """q [N, Hq, D] against each row's first `used` keys in the caches [slots, Hk, D] (in
    q's dtype or float8, read into q's) -> [N, Hq, D]; `table` [N, W] int32: each row's
    blocks of BLOCK slots, in order. (Every row is the newest token of its sequence: it sees
    all of its keys.) `config`: (keys per inner step, warps, pipeline stages), else the
    defaults."""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if n_splits > 1:
        part = torch.empty(n, heads, n_splits, dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(n, heads, n_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out
    bt, warps, stages = config or (32 if n_splits > 1 else 64, 4, 3)
    # K and V tiles of every pipeline stage sit in shared memory (227 KiB a program on
    # Hopper, less elsewhere): fp32 or head_dim 256 shrink the pipeline, then the tile
    fp32 = q.dtype == torch.float32
    budget = (_shared_bytes(q.device) - SHARED_SLACK) // (2 * dim * (4 if fp32 else 2))
    while stages * bt > budget and stages > 1:  # budget: keys (and values) in flight
        stages -= 1
    while stages * bt > budget and bt > 16:
        bt //= 2
    _attention_kernel[(n, kv_heads, n_splits)](
        q, k_cache, v_cache, table, used, out, part, ml, scale, table.shape[1], PAGE=BLOCK,
        HQ=heads, HK=kv_heads,
        G=group, GP=max(16, pow2(group)), D=dim, BT=bt, S=n_splits,
        F32DOT=INTERPRET or fp32, num_warps=warps, num_stages=stages)
    if n_splits > 1:
        _combine_kernel[(n * heads,)](part, ml, out, S=n_splits, SP=max(2, pow2(n_splits)),
                                      D=dim, num_warps=4)
    return out
