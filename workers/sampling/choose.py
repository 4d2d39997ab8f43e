"""The running batch's sampling: the next token of each row, and its logprob.

Sampling is batch-independent by construction: sequence j of a request with seed s draws
token t with Gumbel noise hashed from (s, j, t, token id), so the same seed gives the same
tokens alone or in any batch. Temperature 0 is greedy; then temperature, top-k, top-p.
Returned logprobs are the raw model's (before temperature / top-k / top-p), as a training
forward computes them. `choose` is the arithmetic (compiled by `compile_sampling`); the
fused step's sampling without top-k / top-p runs it in sample_kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.model import LoraModel
from workers.sampling import sample_kernels
from workers.sampling.sequences import Seq

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 multipliers, as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (logical shifts by masking the sign extension)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_noise(streams: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] from a hash of (stream, step, token id): the same numbers
    for a sequence whatever else shares the batch."""
    base = _mix(streams * _GOLDEN + steps)  # [B]
    ids = torch.arange(vocab, device=streams.device, dtype=torch.int64)
    bits = _mix(base[:, None] ^ ids[None, :])  # (no int64 literal times the index: Triton)
    # 23 bits: k + 0.5 is exact in float32, so u < 1 (with 24, the top k rounds u to 1 and
    # the noise to +inf: that id would win whatever its logit)
    u = (((bits >> 41) & ((1 << 23) - 1)).float() + 0.5) * (1.0 / (1 << 23))  # (0, 1)
    return -torch.log(-torch.log(u))


def choose(logits: torch.Tensor, temps: torch.Tensor, streams: torch.Tensor,
           steps: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row [B] and its raw-model logprob [B] from logits [B, V].
    temps[b] = 0 means greedy."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    greedy = temps <= 0
    scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
    if top_k is not None and top_p is not None:
        scaled = _filter(scaled, top_k, top_p)
    noisy = scaled + gumbel_noise(streams, steps, logits.shape[-1])
    tokens = torch.where(greedy, logits.argmax(-1), noisy.argmax(-1))
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


_CHOOSE = [choose]  # swapped for a compiled version by compile_sampling()


def compile_sampling() -> None:
    """torch.compile `choose` (dynamic shapes): noise, scaling, argmax and logprob fused
    into a few kernels over [B, V] instead of a dozen full passes."""
    if _CHOOSE[0] is choose:
        _CHOOSE[0] = torch.compile(choose, dynamic=True)


@torch.compiler.disable  # Inductor (torch 2.11) fails to generate this cumsum's scan on CUDA
def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p per row (dropped tokens at -inf, at least one kept). A row with
    top_p = 1 keeps its whole top-k set, so it comes out as if unfiltered. Eager even in the
    compiled `choose`: the sort dominates it anyway."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    keep = rank[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, -math.inf), dim=-1)
    before = probs.cumsum(-1) - probs
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1)
    return scaled.masked_fill(~torch.zeros_like(keep).scatter(-1, order, keep), -math.inf)


def _stream(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (1 << 62)


@dataclass
class Sampling:
    temps: torch.Tensor  # [B]; 0 = greedy
    streams: torch.Tensor  # [B] noise stream of (seed, sample index)
    steps: torch.Tensor  # [B] index of the token being chosen
    top_k: torch.Tensor | None  # [B], or None when no row filters
    top_p: torch.Tensor | None


def sampling_of(model: LoraModel, seqs: list[Seq]) -> Sampling | None:
    """Per-row sampling tensors; None when every row is greedy."""
    device, specs = model.device, [s.req.spec for s in seqs]
    vocab = model.config.vocab_size
    filtered = any(0 < sp.top_k < vocab or sp.top_p < 1 for sp in specs)
    if not filtered and all(sp.temperature <= 0 for sp in specs):
        return None
    return Sampling(
        temps=torch.tensor([sp.temperature for sp in specs], device=device),
        streams=torch.tensor([_stream(s.req.seed, s.index) for s in seqs], device=device),
        steps=torch.tensor([len(s.tokens) for s in seqs], device=device),
        top_k=torch.tensor([sp.top_k if 0 < sp.top_k < vocab else vocab for sp in specs],
                           device=device) if filtered else None,
        top_p=torch.tensor([sp.top_p for sp in specs], device=device) if filtered else None,
    )


def next_tokens(logits: torch.Tensor, sampling: Sampling | None, fused: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' next tokens and their logprobs (`fused`: the running batch's fused step)."""
    if fused and (sampling is None or sampling.top_k is None):
        # the sampling kernels (each row's vocabulary over many programs); with top-k /
        # top-p, the compiled `choose` (its sort-based filter)
        if sampling is None:  # all greedy
            zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
            return sample_kernels.choose(logits, zeros.float(), zeros, zeros)
        return sample_kernels.choose(logits, sampling.temps, sampling.streams,
                                     sampling.steps)
    if sampling is None:  # all greedy
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    sp = sampling
    return _CHOOSE[0](logits, sp.temps, sp.streams, sp.steps, sp.top_k, sp.top_p)
