"""The fused decode step's Triton kernels, run by Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set in conftest), against the eager arithmetic they replace
(fastpath's functions, addmm for LoRA B, SDPA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers import decode_kernels as dk
from workers import fastpath


def test_the_interpreter_is_on():
    """conftest turns it on before any import; without it every test here would need a GPU."""
    assert dk.triton is not None and dk.available(torch.device("cpu"))

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # bf16: a few roundings apart


def lora_table(rows: int, sizes: list[int], width: int, dtype, g):
    """A block-diagonal B for members of these output sizes, and per-row column ranges:
    row 0 has no adapter, the others alternate between columns [8, 20) and [0, 5)."""
    B = torch.zeros(sum(sizes), len(sizes) * width, dtype=dtype)
    row = 0
    for m, size in enumerate(sizes):
        block = 0.3 * torch.randn(size, width, generator=g)
        B[row : row + size, m * width : (m + 1) * width] = block
        row += size
    ranges = [(0, 0)] + [((0, 5), (8, 20))[r % 2] for r in range(1, rows)]
    cols = torch.tensor(ranges, dtype=torch.int32)
    mask = torch.zeros(rows, width, dtype=dtype)
    for r, (lo, hi) in enumerate(ranges):
        mask[r, lo:hi] = 1
    return B, cols, mask


def eager_lora(y, B, mask, out, members):
    """What decoding._group computes: base columns + ((x Aᵀ) ⊙ mask) scale·Bᵀ."""
    low = y[:, out:] * mask.repeat(1, members)
    return y[:, :out].clone().addmm_(low, B.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("n", [3, 20])
def test_qkv_epilogue_matches_lora_norm_rope_and_writes_the_cache(dtype, lora, n):
    g = torch.Generator().manual_seed(0)
    hq, hk, d, width = 4, 2, 16, 24
    out = (hq + 2 * hk) * d
    y = torch.randn(n, out + (3 * width if lora else 0), generator=g).to(dtype)
    B, cols, mask = lora_table(n, [hq * d, hk * d, hk * d], width, dtype, g)
    qw, kw = ((torch.rand(d, generator=g) + 0.5).to(dtype) for _ in range(2))
    pos = torch.arange(n) * 7 % 31
    inv = 1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    kc, vc = torch.zeros(40, hk, d, dtype=dtype), torch.zeros(40, hk, d, dtype=dtype)
    write = torch.randperm(40, generator=g)[:n]
    q = dk.qkv_epilogue(y, B if lora else None, cols, qw, kw, 1e-6, cos, sin, kc, vc, write, hq)

    full = eager_lora(y, B, mask, out, 3) if lora else y
    rq, rk = fastpath.qk_rope(full[:, : hq * d].view(n, hq, d),
                              full[:, hq * d : (hq + hk) * d].view(n, hk, d), qw, kw, 1e-6,
                              cos, sin)
    rv = full[:, (hq + hk) * d :].view(n, hk, d)
    tol = TOL[dtype]
    torch.testing.assert_close(q.float(), rq.float(), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(kc[write].float(), rk.float(), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(vc[write].float(), rv.float(), atol=tol * 4, rtol=tol)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[write] = False
    assert kc[untouched].abs().max() == 0 and vc[untouched].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_splits", [1, 3])
def test_attention_reads_each_rows_region_with_grouped_heads(dtype, n_splits):
    g = torch.Generator().manual_seed(1)
    hq, hk, d = 6, 2, 16
    kc = torch.randn(300, hk, d, generator=g).to(dtype)
    vc = torch.randn(300, hk, d, generator=g).to(dtype)
    starts = torch.tensor([0, 100, 299, 150], dtype=torch.int32)
    used = torch.tensor([70, 1, 1, 129], dtype=torch.int32)  # (299: a 1-key scratch row)
    q = torch.randn(4, hq, d, generator=g).to(dtype)
    got = dk.attention(q, kc, vc, starts, used, 0.25, n_splits)
    for b in range(4):
        s, m = int(starts[b]), int(used[b])
        k = kc[s : s + m].float().repeat_interleave(hq // hk, 1).transpose(0, 1)
        v = vc[s : s + m].float().repeat_interleave(hq // hk, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=0.25)[:, 0]
        torch.testing.assert_close(got[b].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("n", [3, 20])
def test_add_norm_updates_the_residual_and_returns_its_norm(dtype, lora, n):
    g = torch.Generator().manual_seed(2)
    hidden, width = 300, 24  # 3 column blocks with LoRA, a masked tail
    y = torch.randn(n, hidden + (width if lora else 0), generator=g).to(dtype)
    B, cols, mask = lora_table(n, [hidden], width, dtype, g)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    ref_h, ref_x = fastpath.add_rms_norm(h, eager_lora(y, B, mask, hidden, 1) if lora else y,
                                         w, 1e-6)
    tol = TOL[dtype]
    for _ in range(2):  # again: the LoRA kernel's per-row tickets were reset by the first
        x = dk.add_norm(y, B if lora else None, cols, h, w, 1e-6)
        torch.testing.assert_close(h.float(), ref_h.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(x.float(), ref_x.float(), atol=tol * 4, rtol=tol)
        ref_h, ref_x = fastpath.add_rms_norm(
            ref_h, eager_lora(y, B, mask, hidden, 1) if lora else y, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 20])
def test_silu_mul_adds_each_members_lora(dtype, n):
    g = torch.Generator().manual_seed(3)
    inter, width = 300, 24
    y = torch.randn(n, 2 * inter + 2 * width, generator=g).to(dtype)
    B, cols, mask = lora_table(n, [inter, inter], width, dtype, g)
    full = eager_lora(y, B, mask, 2 * inter, 2)
    ref = fastpath.silu_mul(full[:, :inter], full[:, inter:])
    got = dk.silu_mul(y, B, cols, inter)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("gemv_rows", [8, 0])  # LoRA B in the kernels / by addmm
def test_the_fused_decode_step_gives_the_eager_steps_tokens_and_logprobs(
        tiny_model, monkeypatch, gemv_rows):
    """A mixed batch (two adapters of different ranks, the base model, greedy and seeded
    sampling, rows ending at different steps) through the fused step and the eager one."""
    from tests.unit.test_decoding import spec, with_adapters
    from tests.unit.test_sampler import P1, P2, P3, decode, reference_greedy
    from workers import decoding
    from workers.decoding import RunningBatch

    monkeypatch.setattr(decoding, "LORA_GEMV_ROWS", gemv_rows)
    from workers.lora import BASE_SLOT
    from workers.sampler import adapter_of

    model = with_adapters(tiny_model, 1, 2)
    specs = {"a": spec(P1, 9, 1), "b": spec(P2, 5, BASE_SLOT),
             "c": spec(P3, 7, 2, temperature=0.8, top_k=20, seed=5, num_samples=3),
             "d": spec(P2, 6, 1, temperature=1.0, seed=9, num_samples=2)}
    outs = []
    for fused in (True, False):
        batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096,
                             fused=fused)
        for key, s in specs.items():
            batch.admit(key, s, adapter_of(model, s.slot))
        results = {}
        while batch.busy:
            results.update(batch.step(4))
        outs.append(results)
    for key in specs:
        for got, want in zip(outs[0][key].sequences, outs[1][key].sequences, strict=True):
            assert got.tokens == want.tokens
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                       atol=1e-4, rtol=0)
    assert outs[0]["a"].sequences[0].tokens == reference_greedy(model, P1, 9, slot=1)
