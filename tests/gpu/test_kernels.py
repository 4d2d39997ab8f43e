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

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def attention_reference(q, k, v, starts, used, scale):
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // k.shape[1]
    for n, (s, u) in enumerate(zip(starts.tolist(), used.tolist(), strict=False)):
        kk = k[s : s + u].double().repeat_interleave(group, dim=1)  # [u, Hq, D]
        vv = v[s : s + u].double().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[n].double(), kk) * scale, dim=-1)
        out[n] = torch.einsum("ht,thd->hd", p, vv)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(16, 4, 2), (64, 8, 8), (128, 16, 8),
                                                (128, 32, 8), (256, 8, 1)])
@pytest.mark.parametrize("splits", [1, 4])
def test_attention_matches_float64(dtype, dim, heads, kv_heads, splits):
    g = torch.Generator(device=CUDA).manual_seed(dim + heads)
    capacity = 2048
    k = torch.randn(capacity + 1, kv_heads, dim, generator=g, device=CUDA).to(dtype)
    v = torch.randn(capacity + 1, kv_heads, dim, generator=g, device=CUDA).to(dtype)
    q = torch.randn(3, heads, dim, generator=g, device=CUDA).to(dtype)
    starts = torch.tensor([0, 100, 700, capacity], dtype=torch.int32, device=CUDA)
    used = torch.tensor([1, 37, 1300], dtype=torch.int32, device=CUDA)
    out = ak.attention(q, k, v, starts, used, dim**-0.5, splits)
    ref = attention_reference(q, k, v, starts, used, dim**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=0)


def test_attention_reads_a_cache_past_2_31_elements():
    """The default model's cache was sized at 97.6M tokens from free memory; 32-bit offsets
    into it wrapped and the kernel read outside it (an illegal address)."""
    kv_heads, dim, capacity = 8, 128, (1 << 31) // (8 * 128) + 4096
    k = torch.zeros(capacity + 1, kv_heads, dim, dtype=torch.bfloat16, device=CUDA)
    v = torch.zeros_like(k)
    start = capacity - 64
    g = torch.Generator(device=CUDA).manual_seed(3)
    k[start : start + 64] = torch.randn(64, kv_heads, dim, generator=g, device=CUDA).bfloat16()
    v[start : start + 64] = torch.randn(64, kv_heads, dim, generator=g, device=CUDA).bfloat16()
    q = torch.randn(1, 16, dim, generator=g, device=CUDA).bfloat16()
    starts = torch.tensor([start, capacity], dtype=torch.int32, device=CUDA)
    used = torch.tensor([64], dtype=torch.int32, device=CUDA)
    for splits in (1, 2):
        out = ak.attention(q, k, v, starts, used, dim**-0.5, splits)
        torch.cuda.synchronize()
        ref = attention_reference(q, k, v, starts, used, dim**-0.5)
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
