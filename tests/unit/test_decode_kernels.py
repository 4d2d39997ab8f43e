"""The fused decode step's Triton kernels, run by Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set in conftest), against the eager arithmetic they replace
(fastpath's functions, addmm for LoRA B, SDPA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.sampling import attention_kernels as ak
from workers.sampling import decode_kernels as dk
from workers.sampling import epilogue_kernels as ek
from workers.sampling import gemv_kernel as gk
from workers.sampling.kv_cache import BLOCK, slots
from workers.training import fastpath


def test_the_interpreter_is_on():
    """conftest turns it on before any import; without it every test here would need a GPU."""
    assert dk.triton is not None and dk.available(torch.device("cpu"))

DTYPES = [torch.float32, torch.bfloat16]
gemv_kernel = gk.gemv
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # bf16: a few roundings apart
# rows per program: one (LoRA B as a GEMV per row) and a block of 16 (tensor-core dots over
# the block's adapters, rows past the batch masked)
ROWS = [1, 16]


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
    """What forward._group computes: base columns + ((x Aᵀ) ⊙ mask) scale·Bᵀ."""
    low = y[:, out:] * mask.repeat(1, members)
    return y[:, :out].clone().addmm_(low, B.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("n", [3, 20])
@pytest.mark.parametrize("rows", ROWS)
def test_qkv_epilogue_matches_lora_norm_rope_and_writes_the_cache(dtype, lora, n, rows):
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
    q = ek.qkv_epilogue(y, B if lora else None, cols, qw, kw, 1e-6, cos, sin, kc, vc, write, hq,
                        rows)

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
def test_attention_reads_each_rows_blocks_with_grouped_heads(dtype, n_splits):
    """Rows whose blocks lie scattered and out of order, two rows sharing their first
    blocks (a prompt), and a 1-key row on the scratch block."""
    g = torch.Generator().manual_seed(1)
    hq, hk, d, nblocks = 6, 2, 16, 12
    kc = torch.randn((nblocks + 1) * BLOCK, hk, d, generator=g).to(dtype)
    vc = torch.randn((nblocks + 1) * BLOCK, hk, d, generator=g).to(dtype)
    tables = [[7, 2, 9], [3, 3, 3], [nblocks] * 3, [7, 2, 0, 5, 11]]
    used = torch.tensor([70, 1, 1, 129], dtype=torch.int32)
    table = torch.full((4, 5), nblocks, dtype=torch.int32)
    for row, blocks in enumerate(tables):
        table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    q = torch.randn(4, hq, d, generator=g).to(dtype)
    got = ak.attention(q, kc, vc, table, used, 0.25, n_splits)
    for b in range(4):
        at = slots(tables[b], 0, int(used[b]))
        k = kc[at].float().repeat_interleave(hq // hk, 1).transpose(0, 1)
        v = vc[at].float().repeat_interleave(hq // hk, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=0.25)[:, 0]
        torch.testing.assert_close(got[b].float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("n", [3, 20])
@pytest.mark.parametrize("rows", ROWS)
def test_add_norm_updates_the_residual_and_returns_its_norm(dtype, lora, n, rows):
    g = torch.Generator().manual_seed(2)
    hidden, width = 300, 24  # 3 column blocks with LoRA, a masked tail
    y = torch.randn(n, hidden + (width if lora else 0), generator=g).to(dtype)
    B, cols, mask = lora_table(n, [hidden], width, dtype, g)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    ref_h, ref_x = fastpath.add_rms_norm(h, eager_lora(y, B, mask, hidden, 1) if lora else y,
                                         w, 1e-6)
    tol = TOL[dtype]
    for _ in range(2):  # again: the LoRA kernel's tickets were reset by the first
        x = ek.add_norm(y, B if lora else None, cols, h, w, 1e-6, rows)
        torch.testing.assert_close(h.float(), ref_h.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(x.float(), ref_x.float(), atol=tol * 4, rtol=tol)
        ref_h, ref_x = fastpath.add_rms_norm(
            ref_h, eager_lora(y, B, mask, hidden, 1) if lora else y, w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 20])
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_adds_each_members_lora(dtype, n, rows):
    g = torch.Generator().manual_seed(3)
    inter, width = 300, 24
    y = torch.randn(n, 2 * inter + 2 * width, generator=g).to(dtype)
    B, cols, mask = lora_table(n, [inter, inter], width, dtype, g)
    full = eager_lora(y, B, mask, 2 * inter, 2)
    ref = fastpath.silu_mul(full[:, :inter], full[:, inter:])
    got = ek.silu_mul(y, B, cols, inter, rows)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 100, 512), (5, 64, 96), (16, 33, 256)])
def test_gemv_matches_linear(dtype, m, n, k):
    """Rows padded to 16, a last block of columns cut short, K in one or several steps
    (96: steps of 32, its largest power-of-two divisor)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    got = gk.gemv(x, w)
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()),
                               atol=TOL[dtype], rtol=TOL[dtype])


def test_gemv_declines_what_it_cannot_do():
    x, w = torch.randn(17, 64), torch.randn(8, 64)
    assert gk.gemv(x, w) is None  # more than 16 rows
    assert gk.gemv(x[:4, :40], w[:, :40]) is None  # K's power-of-two divisor 8 < 16
    assert gk.gemv(x[:4, ::2], w[:, :32]) is None  # a strided row


@pytest.mark.parametrize(("path", "top_k", "gemv"),
                         [("gemv", 20, False), ("dots", 20, False), ("addmm", 20, False),
                          (None, 0, True)])
def test_the_fused_decode_step_gives_the_eager_steps_tokens_and_logprobs(
        tiny_model, monkeypatch, path, top_k, gemv):
    """A mixed batch (two adapters of different ranks, the base model, greedy and seeded
    sampling, rows ending at different steps) through the fused step and the eager one:
    LoRA B in the kernels a row per program, in blocks of 16 rows, or by addmm, and by the
    step's own choice; sampling with a top-k row (the compiled `choose` for the batch) and
    without (the sampling kernels); the projections by F.linear, or (`gemv`: every weight
    counts as large) by gemv_kernel.gemv."""
    from workers.sampling import forward

    if gemv:
        monkeypatch.setattr(forward, "GEMV_MIN_BYTES", 0)
        calls = []
        monkeypatch.setattr(gk, "gemv", lambda *a: calls.append(1) or gemv_kernel(*a))
    from tests.unit.test_decoding import spec, with_adapters
    from tests.unit.test_sampler import P1, P2, P3, decode, reference_greedy
    from workers.lora import BASE_SLOT
    from workers.sampling.decoding import RunningBatch
    from workers.sampling.sampler import adapter_of

    model = with_adapters(tiny_model, 1, 2)
    specs = {"a": spec(P1, 9, 1), "b": spec(P2, 5, BASE_SLOT),
             "c": spec(P3, 7, 2, temperature=0.8, top_k=top_k, seed=5, num_samples=3),
             "d": spec(P2, 6, 1, temperature=1.0, seed=9, num_samples=2)}
    outs = []
    for fused in (True, False):
        batch = RunningBatch(model, decode, [511], cuda_graphs=False, kv_tokens=4096,
                             fused=fused)
        batch.lora_path = path
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
    if gemv:
        assert calls  # (7 rows, at most GEMV_ROWS: the matmuls went through gemv)


def test_shapes_the_fused_step_cannot_tile_are_named_at_load():
    from transformers import Qwen3Config

    def config(head_dim: int, heads: int = 8, kv: int = 4) -> Qwen3Config:
        return Qwen3Config(hidden_size=256, num_attention_heads=heads, num_key_value_heads=kv,
                           head_dim=head_dim)

    assert all(dk.unsupported(config(d)) is None for d in (16, 64, 128, 256))
    assert "head_dim=80" in dk.unsupported(config(80))
    assert "head_dim=8 " in dk.unsupported(config(8)) + " "
    assert "head_dim=512" in dk.unsupported(config(512))
    assert "num_key_value_heads=3" in dk.unsupported(config(64, heads=8, kv=3))
