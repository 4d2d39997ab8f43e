"""Triton kernels of a decode step's sampling: `choose.choose` without top-k / top-p (the
next token per row, greedy or Gumbel-max at a temperature, and its raw-model logprob) with
each row's vocabulary spread over many programs.

torch.compile reduces each row of `choose` in one program, so a small batch keeps a few SMs
busy for the whole vocabulary (150k ids). Here two launches do it:

  pieces    grid (row, piece): a piece is a run of whole blocks of the row's ids; per
            block it stores the logits' max and Σ exp(logit - max), and over the piece it
            keeps the logits' max with its first id (greedy) and the noisy scaled scores'
            max with its first id (sampled rows)
  combine   grid (row,): the log-softmax normaliser from the blocks' partials, the token
            from the pieces' (the largest value, the smallest id among equals: torch's
            first-index argmax), and logprob = logit[token] - normaliser

The normaliser is reduced from per-block partials, not per-piece ones, so its summation
order depends on the vocabulary and the block size alone: a row's logprob is the same to
the bit whatever the batch and however many pieces it was cut into. The argmaxes are exact
whatever the order.

The noise is `choose.gumbel_noise` bit for bit: the same splitmix64 hash of (stream, step,
id) on int64 (Triton's int64 multiply wraps and its `>>` is arithmetic, as torch's, hence the
same masks), the same 23-bit uniform and -log(-log(u)). On CUDA the logs are libdevice's
logf and logit / temperature is an IEEE division (`div_rn`), as torch's eager kernels
compute them (Triton's `/` lowers to the approximate div.full.f32, and `tl.log` is not
promised to be logf). The interpreter cannot call libdevice: there numpy's float32 log
stands in, which can differ from torch's CPU log by an ulp. The normaliser's exps are
exp2 (ex2.approx on the GPU): logprobs agree with torch's log_softmax to about 1e-6, not
to the bit.

Greedy rows never hash. Sampled rows hash every id.

NaN logits are not handled as torch's argmax handles them (it returns the first NaN).
"""

from __future__ import annotations

import torch

# (where these kernels run: decode_kernels.available, as the fused step they belong to)
from workers.sampling.decode_kernels import pow2

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

BLOCK = 2048  # ids per block on the GPU (8 warps: 8 ids per thread)
PROGRAMS_PER_SM = 3

# choose's splitmix64 multipliers and golden-ratio increment, as signed int64 (copied, not
# imported: choose imports this module)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


if triton is not None:
    _M1_C = tl.constexpr(_M1)  # Triton reads module globals only as constexprs
    _M2_C = tl.constexpr(_M2)
    _GOLDEN_C = tl.constexpr(_GOLDEN)
    _LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _mix(x):
        """splitmix64's finaliser on int64, `choose._mix` line for line."""
        x = x ^ ((x >> 30) & ((1 << 34) - 1))
        x = x * _M1_C
        x = x ^ ((x >> 27) & ((1 << 37) - 1))
        x = x * _M2_C
        return x ^ ((x >> 31) & ((1 << 33) - 1))

    @triton.jit
    def _log(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:  # torch's logf on CUDA (tl.log is lg2.approx there)
            return libdevice.log(x)
        else:  # the interpreter: numpy's
            return tl.log(x)

    @triton.jit
    def _pieces_kernel(
        logits_ptr,
        stride,
        temps_ptr,
        streams_ptr,
        steps_ptr,
        vocab,
        chunk,
        stats_ptr,
        vals_ptr,
        ids_ptr,
        NB,
        S,
        BLOCK: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):
        b = tl.program_id(0)
        s = tl.program_id(1)
        lo = s * chunk  # a multiple of BLOCK: the piece is whole blocks (the last one cut)
        hi = tl.minimum(lo + chunk, vocab)
        row = logits_ptr + b.to(tl.int64) * stride
        temp = tl.load(temps_ptr + b)
        sample = temp > 0
        temp = tl.where(sample, temp, 1.0)  # as choose's divisor: greedy rows never divide
        base = _mix(tl.load(streams_ptr + b) * _GOLDEN_C + tl.load(steps_ptr + b))
        lane = tl.arange(0, BLOCK)
        # per lane: the best value so far and its id. Each lane sees increasing ids, so a
        # strict > keeps the first of equals; the lanes are merged by smallest id at the end
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        top_id = lo + lane
        pick = tl.full([BLOCK], float("-inf"), tl.float32)
        pick_id = lo + lane
        for i0 in range(lo, hi, BLOCK):
            i = i0 + lane
            x = tl.load(row + i, mask=i < hi, other=float("-inf")).to(tl.float32)
            better = x > top
            top = tl.where(better, x, top)
            top_id = tl.where(better, i, top_id)
            xmax = tl.max(x, axis=0)
            shift = tl.where(xmax == float("-inf"), 0.0, xmax)  # no -inf - -inf
            at = (b * NB + i0 // BLOCK) * 2
            tl.store(stats_ptr + at, xmax)
            tl.store(stats_ptr + at + 1, tl.sum(tl.exp2((x - shift) * _LOG2E), axis=0))
            if sample:
                bits = _mix(base ^ i.to(tl.int64))
                u = (((bits >> 41) & ((1 << 23) - 1)).to(tl.float32) + 0.5) * (1.0 / (1 << 23))
                noise = -_log(-_log(u, LIBDEVICE), LIBDEVICE)
                y = tl.math.div_rn(x, temp) + noise  # masked ids: -inf
                up = y > pick
                pick = tl.where(up, y, pick)
                pick_id = tl.where(up, i, pick_id)
        big = 2147483647
        at = (b * S + s) * 2
        best = tl.max(top, axis=0)
        tl.store(vals_ptr + at, best)
        tl.store(ids_ptr + at, tl.min(tl.where(top == best, top_id, big), axis=0))
        best = tl.max(pick, axis=0)
        tl.store(vals_ptr + at + 1, best)
        tl.store(ids_ptr + at + 1, tl.min(tl.where(pick == best, pick_id, big), axis=0))

    @triton.jit
    def _combine_kernel(
        logits_ptr,
        stride,
        temps_ptr,
        stats_ptr,
        vals_ptr,
        ids_ptr,
        tokens_ptr,
        logprobs_ptr,
        NB,
        S,
        NBP: tl.constexpr,
        SP: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):
        b = tl.program_id(0)
        k = tl.arange(0, NBP)
        m = tl.load(stats_ptr + (b * NB + k) * 2, mask=k < NB, other=float("-inf"))
        l = tl.load(stats_ptr + (b * NB + k) * 2 + 1, mask=k < NB, other=0.0)  # noqa: E741
        top = tl.max(m, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(l * tl.exp2((m - shift) * _LOG2E), axis=0)  # in block order
        big = 2147483647
        s = tl.arange(0, SP)
        at = (b * S + s) * 2
        sm = s < S
        # pieces hold increasing ids: the smallest id among the maxima is the first
        val = tl.load(vals_ptr + at, mask=sm, other=float("-inf"))
        ids = tl.load(ids_ptr + at, mask=sm, other=big)
        greedy = tl.min(tl.where(val == tl.max(val, axis=0), ids, big), axis=0)
        val = tl.load(vals_ptr + at + 1, mask=sm, other=float("-inf"))
        ids = tl.load(ids_ptr + at + 1, mask=sm, other=big)
        sampled = tl.min(tl.where(val == tl.max(val, axis=0), ids, big), axis=0)
        token = tl.where(tl.load(temps_ptr + b) > 0, sampled, greedy)
        x = tl.load(logits_ptr + b.to(tl.int64) * stride + token).to(tl.float32)
        tl.store(tokens_ptr + b, token.to(tl.int64))
        tl.store(logprobs_ptr + b, (x - top) - _log(total, LIBDEVICE))  # as log_softmax


# --- launchers ----------------------------------------------------------------------------
def splits(rows: int, vocab: int, device: torch.device, block: int = BLOCK) -> int:
    """Pieces each row's vocabulary is cut into: about PROGRAMS_PER_SM programs per SM over
    the batch, and no piece shorter than a block."""
    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 132
    )
    want = -(-PROGRAMS_PER_SM * sms // max(rows, 1))
    return max(1, min(want, -(-vocab // block)))


def choose(
    logits: torch.Tensor,
    temps: torch.Tensor,
    streams: torch.Tensor,
    steps: torch.Tensor,
    *,
    block: int = BLOCK,
    n_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row [B] (int64) and its raw-model logprob [B] (fp32) from logits
    [B, V] (bf16 or fp32): `choose.choose` with no top-k / top-p. temps[b] <= 0 is greedy;
    streams and steps [B] seed each row's noise. `block` (a power of two) and `n_splits`
    (default: `splits`) change the work's layout, never the tokens or the logprobs."""
    rows, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    if rows == 0:
        return tokens, logprobs
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    temps = temps.to(torch.float32).contiguous()
    streams = streams.to(torch.int64).contiguous()
    steps = steps.to(torch.int64).contiguous()
    blocks = -(-vocab // block)
    per_piece = -(-blocks // (n_splits or splits(rows, vocab, device, block)))
    pieces = -(-blocks // per_piece)  # every piece non-empty
    stats = torch.empty(rows, blocks, 2, dtype=torch.float32, device=device)
    vals = torch.empty(rows, pieces, 2, dtype=torch.float32, device=device)
    ids = torch.empty(rows, pieces, 2, dtype=torch.int32, device=device)
    libdevice_log = device.type == "cuda"
    _pieces_kernel[(rows, pieces)](
        logits,
        logits.stride(0),
        temps,
        streams,
        steps,
        vocab,
        per_piece * block,
        stats,
        vals,
        ids,
        blocks,
        pieces,
        BLOCK=block,
        LIBDEVICE=libdevice_log,
        num_warps=max(1, min(8, block // 256)),
    )
    _combine_kernel[(rows,)](
        logits,
        logits.stride(0),
        temps,
        stats,
        vals,
        ids,
        tokens,
        logprobs,
        blocks,
        pieces,
        NBP=max(2, pow2(blocks)),
        SP=max(2, pow2(pieces)),
        LIBDEVICE=libdevice_log,
        num_warps=4 if blocks > 256 else 1,
    )
    return tokens, logprobs
