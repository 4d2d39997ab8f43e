"""The projections of a fused decode step of a few rows (decode_kernels tells the design):
`gemv`, the rows padded to 16 for one tensor-core dot per block of weight columns, the
weight streamed once.
"""

from __future__ import annotations

import math

import torch

from workers.sampling.decode_kernels import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

GEMV_BK = 256  # K per inner step of gemv (at most: the largest power of two dividing K)
GEMV_CONFIG = (32, 4, 4)  # gemv's (columns per program, warps, pipeline stages)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, x_stride, w_ptr, w_stride, out_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     F32DOT: tl.constexpr):
        """out[:M, block of BN columns] = x[:M] · w[block]ᵀ over all of K (a multiple of
        BK): the rows padded to BM for a tensor-core dot, w streamed once."""
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        live = cols < N
        rows = tl.arange(0, BM)
        k = tl.arange(0, BK)
        xs = x_ptr + rows[:, None] * x_stride + k[None, :]
        ws = w_ptr + tl.where(live, cols, 0).to(tl.int64)[:, None] * w_stride + k[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            xt = tl.load(xs + k0, mask=(rows < M)[:, None], other=0.0)
            wt = tl.load(ws + k0)
            if F32DOT:  # IEEE: Triton's default for fp32 dots is TF32
                acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)),
                              input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt))
        tl.store(out_ptr + rows[:, None] * N + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & live[None, :])


# --- launcher -----------------------------------------------------------------------------
def gemv(x: torch.Tensor, weight: torch.Tensor,
         config: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """x [M ≤ 16, K] · weightᵀ [N, K] -> [M, N] for a decode step's projections, or None
    when the shapes do not suit (the caller then takes F.linear). `config`: (columns per
    program, warps, pipeline stages)."""
    m, k = x.shape
    bk = min(GEMV_BK, k & -k)
    if m > 16 or bk < 16 or x.stride(1) != 1 or weight.stride(1) != 1:
        return None
    n = weight.shape[0]
    bn, warps, stages = config or GEMV_CONFIG
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(math.ceil(n / bn),)](
        x, x.stride(0), weight, weight.stride(0), out, m, n, k, BM=16, BN=bn, BK=bk,
        F32DOT=INTERPRET or x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out
