"""The decode step's Triton kernels on the GPU against float64 references, over the shapes
the worker accepts (head_dim 16 to 256, GQA ratios 1 to 8, KV caches past 2**31 elements)
and both dtypes. fp32 must be IEEE-exact up to summation order (Triton's fp32 dots default
to TF32, which is 1e-3 off); bf16 within a few roundings of its result."""

from __future__ import annotations

import pytest
import torch

from workers.sampling import attention_kernels as ak
from workers.sampling import gemv_kernel as gk
from workers.sampling import sample_kernels as sk
from workers.sampling.kv_cache import BLOCK, blocks_for, slots

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def attention_reference(q, k, v, tables, used, scale):
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // k.shape[1]
    for n, (t, u) in enumerate(zip(tables, used.tolist(), strict=True)):
        at = torch.tensor(slots(t, 0, u), device=q.device)
        kk = k[at].double().repeat_interleave(group, dim=1)  # [u, Hq, D]
        vv = v[at].double().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[n].double(), kk) * scale, dim=-1)
        out[n] = torch.einsum("ht,thd->hd", p, vv)
    return out


def table_of(tables: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(tables), max(map(len, tables))), fill, dtype=torch.int32)
    for row, t in enumerate(tables):
        out[row, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(16, 4, 2), (64, 8, 8), (128, 16, 8),
                                                (128, 32, 8), (256, 8, 1)])
@pytest.mark.parametrize("splits", [1, 4])
def test_attention_matches_float64(dtype, dim, heads, kv_heads, splits):
    """Rows over scattered blocks, two sharing their first blocks (a prompt)."""
    g = torch.Generator(device=CUDA).manual_seed(dim + heads)
    blocks = 2048 // BLOCK
    k = torch.randn((blocks + 1) * BLOCK, kv_heads, dim, generator=g, device=CUDA).to(dtype)
    v = torch.randn((blocks + 1) * BLOCK, kv_heads, dim, generator=g, device=CUDA).to(dtype)
    q = torch.randn(4, heads, dim, generator=g, device=CUDA).to(dtype)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(dim)).tolist()
    long = order[: blocks_for(1300)]
    tables = [[order[-1]], [order[-2], order[-3]], long, long[:3] + [order[-4]]]
    used = torch.tensor([1, 37, 1300, 3 * BLOCK + 5], dtype=torch.int32, device=CUDA)
    out = ak.attention(q, k, v, table_of(tables, blocks), used, dim**-0.5, splits)
    ref = attention_reference(q, k, v, tables, used, dim**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)


def test_attention_reads_a_cache_past_2_31_elements():
    """The default model's cache was sized at 97.6M tokens from free memory; 32-bit offsets
    into it wrapped and the kernel read outside it (an illegal address)."""
    kv_heads, dim = 8, 128
    blocks = ((1 << 31) // (8 * 128) + 4096) // BLOCK
    k = torch.zeros((blocks + 1) * BLOCK, kv_heads, dim, dtype=torch.bfloat16, device=CUDA)
    v = torch.zeros_like(k)
    tables = [[blocks - 1, blocks - 2]]  # the last blocks, out of order
    g = torch.Generator(device=CUDA).manual_seed(3)
    at = torch.tensor(slots(tables[0], 0, 2 * BLOCK), device=CUDA)
    k[at] = torch.randn(2 * BLOCK, kv_heads, dim, generator=g, device=CUDA).bfloat16()
    v[at] = torch.randn(2 * BLOCK, kv_heads, dim, generator=g, device=CUDA).bfloat16()
    q = torch.randn(1, 16, dim, generator=g, device=CUDA).bfloat16()
    used = torch.tensor([2 * BLOCK], dtype=torch.int32, device=CUDA)
    for splits in (1, 2):
        out = ak.attention(q, k, v, table_of(tables, blocks), used, dim**-0.5, splits)
        torch.cuda.synchronize()
        ref = attention_reference(q, k, v, tables, used, dim**-0.5)
        torch.testing.assert_close(out.double(), ref, atol=TOL[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 151936, 64), (5, 3072, 1024), (16, 1024, 3072)])
def test_gemv_matches_float64(dtype, rows, n, k):
    g = torch.Generator(device=CUDA).manual_seed(rows)
    x = torch.randn(rows, k, generator=g, device=CUDA).to(dtype)
    w = (torch.randn(n, k, generator=g, device=CUDA) * k**-0.5).to(dtype)
    out = gk.gemv(x, w)
    ref = x.double() @ w.double().T
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_token_logprobs_are_the_models_log_softmax(dtype):
    """The logprob returned with each token (greedy or sampled at any temperature) is the
    raw model's log-softmax of that token: to 1e-5 of float64 for the same logits."""
    g = torch.Generator(device=CUDA).manual_seed(5)
    rows, vocab = 64, 151936
    logits = (torch.randn(rows, vocab, generator=g, device=CUDA) * 4).to(dtype)
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3] * (rows // 4), device=CUDA)
    streams = torch.arange(rows, device=CUDA) * 7919
    steps = torch.full((rows,), 3, device=CUDA)
    tokens, logprobs = sk.choose(logits, temps, streams, steps)
    ref = torch.log_softmax(logits.double(), dim=-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), ref, atol=1e-5, rtol=0)
    assert (tokens[temps == 0] == logits[temps == 0].float().argmax(-1)).all()
    assert (ref[temps > 0] < -2).any()  # sampled tokens include unlikely ones
