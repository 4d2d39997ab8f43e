"""Batched autoregressive sampling with a KV cache, many requests and adapters per call.

`sample(model, specs, decode, eos_token_ids)` runs every sequence of every request through one
forward per decode step:

  1. prefill: one row per request (prompts left-padded, position_ids = cumsum(mask) - 1), which
     also yields the prompt logprobs;
  2. the prefill cache is fanned out to one row per sample (a request's samples share it);
  3. decode: choose a token per row, check its stop conditions, drop finished rows from the
     batch and cache, and feed the new tokens.

Sampling follows Tinker: temperature 0 is greedy; otherwise logits / T, then top-k, then top-p,
then a draw. Each sequence owns a `torch.Generator` seeded from (seed, sample index), so its
tokens do not depend on what else shares the batch. Returned logprobs are those of the raw
model distribution (before temperature / top-k / top-p), as a training forward computes them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.jobs import UserError
from workers.lora import BASE_SLOT
from workers.model import LoraModel

EMPTY_TOPK_LOGPROB = -99999.0  # Tinker's filler for prompt position 0, which has no prediction


@dataclass
class SampleSpec:
    """One sampling request: `num_samples` continuations of `prompt` on adapter `slot`."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    slot: int  # adapter slot, BASE_SLOT for the base model
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 / 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    stop_at_eos: bool = True
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSeq:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"


@dataclass
class SampleOutput:
    sequences: list[SampledSeq]
    prompt_logprobs: list[float] | None  # [len(prompt)], NaN first
    topk_prompt: tuple[np.ndarray, np.ndarray] | None  # ids int32, logprobs fp32 [len(prompt), k]


@dataclass
class _Row:
    """A sequence being generated."""

    req: int  # index into the valid specs
    spec: SampleSpec
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def sample(
    model: LoraModel,
    specs: list[SampleSpec],
    decode: Callable[[list[int]], str],
    eos_token_ids: list[int],
) -> list[SampleOutput | Exception]:
    """One output per spec, in order; a spec that fails gets its Exception in its place."""
    results: list[SampleOutput | Exception | None] = [None] * len(specs)
    valid: list[int] = []
    for i, spec in enumerate(specs):
        try:
            _validate(spec, model)
            valid.append(i)
        except UserError as e:
            results[i] = e
    if valid:
        try:
            with torch.inference_mode():
                outs = _run(model, [specs[i] for i in valid], decode, set(eos_token_ids))
        except Exception as e:  # a batch-wide failure becomes every request's error
            outs = [e] * len(valid)
        for i, out in zip(valid, outs, strict=True):
            results[i] = out
    return results  # type: ignore[return-value]


def _validate(spec: SampleSpec, model: LoraModel) -> None:
    vocab = model.vocab_size
    max_pos = getattr(model.config, "max_position_embeddings", None)
    _check(len(spec.prompt) >= 1, "prompt is empty; it needs at least 1 token")
    for name, ids in (("prompt", spec.prompt), ("stop token id", spec.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab]
        _check(not bad, f"{name} {bad[:1]} is outside the vocabulary [0, {vocab})")
    _check(spec.num_samples >= 1, f"num_samples={spec.num_samples} must be at least 1")
    _check(spec.max_tokens >= 1, f"max_tokens={spec.max_tokens} must be at least 1")
    total = len(spec.prompt) + spec.max_tokens
    _check(
        max_pos is None or total <= max_pos,
        f"prompt length + max_tokens = {total} exceeds the model's context of {max_pos}",
    )
    _check(
        math.isfinite(spec.temperature) and spec.temperature >= 0,
        f"temperature={spec.temperature} must be a finite number >= 0",
    )
    _check(0 < spec.top_p <= 1, f"top_p={spec.top_p} must be in (0, 1]")
    _check(spec.top_k >= -1, f"top_k={spec.top_k} must be -1 (off) or >= 0")
    k = spec.topk_prompt_logprobs
    _check(0 <= k <= vocab, f"topk_prompt_logprobs={k} must be in [0, {vocab}]")
    _check(
        spec.slot == BASE_SLOT or spec.slot in model.adapters,
        f"adapter slot {spec.slot} holds no adapter",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _run(
    model: LoraModel, specs: list[SampleSpec], decode: Callable[[list[int]], str], eos: set[int]
) -> list[SampleOutput]:
    device = model.device
    cache, mask, logits = _prefill(model, specs)  # logits [R, W, V]
    prompt_outs = [_prompt_outputs(s, logits[r, -len(s.prompt) :]) for r, s in enumerate(specs)]
    seeds = [secrets.randbits(63) if s.seed is None else s.seed for s in specs]
    rows = [
        _Row(r, s, _generator(seeds[r], j, device))
        for r, s in enumerate(specs)
        for j in range(s.num_samples)
    ]
    # Fan the prefill out to one row per sample.
    fan = torch.tensor([row.req for row in rows], device=device)
    cache.batch_select_indices(fan)
    mask, last = mask[fan], logits[fan, -1].float()  # [B, W], [B, V]
    positions = mask.sum(-1)  # [B] position of the next token
    active = rows
    while True:
        tokens = _choose(last, active)  # [B]
        for row, t, lp in zip(active, tokens.tolist(), _raw_logprobs(last, tokens), strict=True):
            row.tokens.append(t)
            row.logprobs.append(lp)
            row.stop_reason = _stop_reason(row, decode, eos)
        keep = [i for i, row in enumerate(active) if row.stop_reason is None]
        if not keep:
            break
        if len(keep) < len(active):  # compact: finished rows leave the batch and the cache
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, positions, tokens = mask[idx], positions[idx], tokens[idx]
            active = [active[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # [B, W + t]
        step_logits, cache = model.forward_logits(
            tokens[:, None], mask, [r.spec.slot for r in active], positions[:, None], cache, True
        )
        last, positions = step_logits[:, -1].float(), positions + 1
    return _collect(specs, rows, prompt_outs)


def _prefill(
    model: LoraModel, specs: list[SampleSpec]
) -> tuple[object, torch.Tensor, torch.Tensor]:
    """Left-padded prefill of each request's prompt: (cache, mask [R, W], logits [R, W, V]).

    The logits stay in the model's dtype; callers upcast the slices they read.
    """
    width = max(len(s.prompt) for s in specs)
    ids = torch.zeros(len(specs), width, dtype=torch.long)
    mask = torch.zeros(len(specs), width, dtype=torch.long)
    for r, s in enumerate(specs):
        ids[r, width - len(s.prompt) :] = torch.tensor(s.prompt)
        mask[r, width - len(s.prompt) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [R, W]; pads get 0, masked out anyway
    slots = [s.slot for s in specs]
    logits, cache = model.forward_logits(ids, mask, slots, positions, None, True)
    return cache, mask, logits


def _generator(seed: int, j: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + j) % 2**63)
    return gen


def _choose(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Next token per row [B] from raw logits [B, V] (fp32), each row with its own params."""
    greedy = logits.argmax(-1)  # [B]
    if all(r.spec.temperature == 0 for r in rows):
        return greedy
    device, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([r.spec.temperature or 1.0 for r in rows], device=device)
    scaled = logits / temps[:, None]
    if any(0 < r.spec.top_k < vocab or r.spec.top_p < 1 for r in rows):  # sort only if needed
        top_k = torch.tensor([r.spec.top_k if r.spec.top_k > 0 else vocab for r in rows],
                             device=device)
        scaled = _filter(scaled, top_k, torch.tensor([r.spec.top_p for r in rows], device=device))
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    # Exponential race: argmax(p / E), E ~ Exp(1) from the row's own generator, is a draw
    # from p that consumes the same random numbers whatever else is in the batch.
    noise = torch.stack([_exp_noise(r, vocab, device) for r in rows])  # [B, V]
    sampled = (probs / noise).argmax(-1)
    is_greedy = torch.tensor([r.spec.temperature == 0 for r in rows], device=device)
    return torch.where(is_greedy, greedy, sampled)


def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p per row: logits [B, V] with dropped tokens at -inf (>= 1 kept).

    A row with top_p = 1 keeps its whole top-k set (rounding in the cumulative sum must not
    drop its tail), so such a row comes out the same as if it had not been filtered."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    keep = rank[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, -math.inf), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1)  # smallest prefix reaching top_p
    keep_by_id = torch.zeros_like(keep).scatter(-1, order, keep)
    return scaled.masked_fill(~keep_by_id, -math.inf)


def _exp_noise(row: _Row, vocab: int, device: torch.device) -> torch.Tensor:
    if row.spec.temperature == 0:
        return torch.ones(vocab, device=device)
    noise = torch.empty(vocab, device=device).exponential_(generator=row.gen)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # 0/0 would be NaN


def _raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    """log p(token) under the unscaled distribution, per row."""
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    return logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()


def _stop_reason(row: _Row, decode: Callable[[list[int]], str], eos: set[int]) -> str | None:
    spec, token = row.spec, row.tokens[-1]
    if token in spec.stop_token_ids or (spec.stop_at_eos and token in eos):
        return "stop"
    # The whole generation is decoded, so strings that span tokens (and tokens whose text
    # depends on their neighbours) are matched exactly.
    if spec.stop_strings:
        text = decode(row.tokens)
        if any(s in text for s in spec.stop_strings):
            return "stop"
    return "length" if len(row.tokens) >= spec.max_tokens else None


def _prompt_outputs(
    spec: SampleSpec, logits: torch.Tensor
) -> tuple[list[float] | None, tuple[np.ndarray, np.ndarray] | None]:
    """Prompt logprobs and top-k from the prefill logits of the prompt positions [L, V]."""
    if not spec.prompt_logprobs and spec.topk_prompt_logprobs == 0:
        return None, None
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [L-1, V]; row i predicts prompt[i+1]
    plp = None
    if spec.prompt_logprobs:
        targets = torch.tensor(spec.prompt[1:], device=logp.device, dtype=torch.long)
        plp = [math.nan] + logp.gather(-1, targets[:, None]).squeeze(-1).tolist()
    topk = None
    if (k := spec.topk_prompt_logprobs) > 0:
        vals, ids = logp.topk(k, dim=-1)  # [L-1, k]
        topk_ids = np.zeros((len(spec.prompt), k), dtype=np.int32)
        topk_lp = np.full((len(spec.prompt), k), EMPTY_TOPK_LOGPROB, dtype=np.float32)
        topk_ids[1:], topk_lp[1:] = ids.cpu().numpy(), vals.cpu().numpy()
        topk = (topk_ids, topk_lp)
    return plp, topk


def _collect(
    specs: list[SampleSpec],
    rows: list[_Row],
    prompt_outs: list[tuple[list[float] | None, tuple[np.ndarray, np.ndarray] | None]],
) -> list[SampleOutput]:
    outs = [SampleOutput([], plp, topk) for plp, topk in prompt_outs]
    for row in rows:
        seq = SampledSeq(row.tokens, row.logprobs, row.stop_reason or "length")
        outs[row.req].sequences.append(seq)
    return outs
