"""The sampling kernels, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in
conftest), against `choose.choose` (uncompiled, no top-k / top-p), which they replace.

The interpreter is slow (a few ms per block of ids), so the vocabularies are small and the
blocks too (128 or 256 ids, against 2048 on the GPU), cut into 3 pieces: every case runs
several pieces of several blocks, the last block of a row cut short."""

from __future__ import annotations

import pytest
import torch

from workers.sampling import choose, decode_kernels
from workers.sampling import sample_kernels as sk

# vocab -> block: 3 pieces of 3, 3, 2 blocks (1000) or 7, 7, 6 blocks (5003), a short last one
BLOCKS = {1000: 128, 5003: 256}


def test_the_interpreter_is_on():
    """conftest turns it on before any import; without it every test here would need a GPU."""
    assert sk.triton is not None and decode_kernels.available(torch.device("cpu"))


def test_the_hash_constants_are_those_of_choose():
    """Copied, not imported (choose imports sample_kernels): they must not drift."""
    assert (sk._M1, sk._M2, sk._GOLDEN) == (choose._M1, choose._M2, choose._GOLDEN)


def inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int):
    """Logits at a spread like a model's, temperatures cycling through greedy, 0.7, 1.0 and
    1.5, random streams (up to 2^62, as choose._stream gives) and steps."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(dtype)
    temps = torch.tensor([0.0, 0.7, 1.0, 1.5]).repeat(rows)[:rows]
    streams = torch.randint(0, 1 << 62, (rows,), generator=g)
    steps = torch.randint(0, 5000, (rows,), generator=g)
    return logits, temps, streams, steps


def check(logits, temps, streams, steps, **layout):
    tokens, logprobs = sk.choose(logits, temps, streams, steps, **layout)
    want_tokens, want_logprobs = choose.choose(logits, temps, streams, steps)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=0)
    return tokens, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "vocab", "seed"), [(1, 5003, 0), (5, 1000, 1), (5, 5003, 2), (20, 1000, 3)]
)
def test_matches_choose(dtype, rows, vocab, seed):
    check(*inputs(rows, vocab, dtype, seed), block=BLOCKS[vocab], n_splits=3)


def test_greedy_ties_take_the_first_index():
    """The maximum twice: in one lane of two blocks, two lanes of one block, two pieces
    (either order of lanes); and a row that is all one value."""
    pairs = [(10, 138), (100, 20), (50, 900), (990, 400), (127, 128)]
    logits = torch.randn(len(pairs) + 1, 1000, generator=torch.Generator().manual_seed(4))
    for r, pair in enumerate(pairs):
        logits[r, list(pair)] = 9.0
    logits[-1] = 1.5
    rows = logits.shape[0]
    temps, zeros = torch.zeros(rows), torch.zeros(rows, dtype=torch.int64)
    tokens, _ = check(logits, temps, zeros, zeros, block=128, n_splits=3)
    assert tokens.tolist() == [min(p) for p in pairs] + [0]


def test_sampled_tokens_follow_the_stream_and_the_step():
    """Flat logits: the token is the noise's argmax, so it changes with the stream and with
    the step (and would stay at id 0, the greedy one, if the noise were ignored)."""
    n = 12
    logits = torch.zeros(n, 1000)
    temps = torch.ones(n)
    by_stream = check(
        logits, temps, torch.arange(n) * 1_000_003, torch.full((n,), 7), block=128, n_splits=3
    )[0]
    by_step = check(logits, temps, torch.full((n,), 99), torch.arange(n), block=128, n_splits=3)[0]
    assert len(set(by_stream.tolist())) >= n - 2 and len(set(by_step.tolist())) >= n - 2


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # numpy: log(0)
def test_the_top_hash_value_gives_finite_noise():
    """Stream 7098 at step 0 hashes id 279 to all ones in the uniform's 23 bits (see
    test_decoding's Gumbel test): the kernel's noise stays finite there as choose's, and
    a logit of -20 is not chosen."""
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5))
    logits[:, 279] = -20.0
    streams = torch.tensor([7098, 7098, 7099])
    tokens = check(
        logits,
        torch.tensor([1.0, 0.0, 1.0]),
        streams,
        torch.zeros(3, dtype=torch.int64),
        block=128,
        n_splits=3,
    )[0]
    assert 279 not in tokens.tolist()


def test_a_row_does_not_depend_on_its_batch_or_its_pieces():
    """The same row alone (default pieces: one block each) and as row 3 of 8 (3 pieces, then
    1): the same token and, to the bit, the same logprob, since the normaliser is summed in
    block order whatever the pieces."""
    logits, temps, streams, steps = inputs(8, 1000, torch.float32, 6)
    temps[3] = 1.0
    alone = sk.choose(logits[3:4], temps[3:4], streams[3:4], steps[3:4], block=128)
    for n_splits in (3, 1):
        tokens, logprobs = sk.choose(logits, temps, streams, steps, block=128, n_splits=n_splits)
        assert tokens[3] == alone[0][0] and logprobs[3] == alone[1][0]


def test_splits_fill_the_gpu_without_short_pieces():
    cpu = torch.device("cpu")  # counts 132 SMs, an H100's
    assert sk.splits(1, 151_936, cpu) == 75  # one 2048-id block each: 75 blocks
    assert sk.splits(128, 151_936, cpu) == 4  # ~3 programs per SM
    assert sk.splits(1, 1000, cpu) == 1


def test_an_empty_batch():
    tokens, logprobs = sk.choose(
        torch.zeros(0, 1000),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )
    assert tokens.shape == (0,) and logprobs.shape == (0,)
