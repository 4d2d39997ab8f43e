"""Sampling requests and their answers: SampleSpec, its validation and adapter, and the
SampleOutput a request gets (with its prompt logprobs, from the prefill's logits).

The generation itself is `workers.sampling.decoding.RunningBatch` (continuous batching, a
paged KV cache, CUDA graphs, batch-independent seeded sampling), which builds on this module.
The worker keeps one running batch across ticks; `decoding.sample()` makes a private one for
a fixed list of requests (tests, tools).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from protocol.jobs import Outcome, UserError
from protocol.wire import WireSequence, encode_sample_response
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
    topk_sample_logprobs: int = 0  # the top k of each sampled position's distribution
    prompt_logprobs_last_n: int | None = None  # score only the prompt's last n tokens
    prompt_alt_tokens_k: int = 0  # draws at every prompt position after the first
    target_prompt: dict | None = None  # {"ids": [L-1][K] (-1: none), "layout": CSR | None}
    first_index: int = 0  # the index of the first sample (a data-parallel replica's block)

    @classmethod
    def of(cls, body: dict[str, Any], slot: int) -> SampleSpec:
        """The spec of a sample job's payload (protocol/jobs.py), on adapter `slot`."""
        names = {f.name for f in fields(cls)} - {"slot", "first_index"}
        return cls(slot=slot, **{k: v for k, v in body.items() if k in names})

    @property
    def scores_prompt(self) -> bool:
        """Whether the prefill must keep the logits of every prompt position."""
        return bool(self.prompt_logprobs or self.topk_prompt_logprobs or self.target_prompt
                    or self.prompt_alt_tokens_k)


@dataclass
class SampledSeq:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk: tuple[np.ndarray, np.ndarray] | None = None  # ids int32, logprobs fp32 [len, k]


@dataclass
class PromptOut:
    """What a request asked for of its prompt, from the prefill's logits."""

    logprobs: list[float] | None = None  # [len(prompt)], NaN first (and before the last n)
    topk: tuple[np.ndarray, np.ndarray] | None = None  # ids int32, logprobs fp32 [len, k]
    target: tuple[np.ndarray, dict | None] | None = None  # fp32 [len-1, K], the CSR layout
    alt: tuple[np.ndarray, np.ndarray] | None = None  # tokens int64, logprobs fp32 [len-1, k]
    cache_hit_tokens: int = 0  # prompt tokens found prefilled (a running call's prompt)


@dataclass
class SampleOutput:
    sequences: list[SampledSeq]
    prompt: PromptOut


def adapter_of(model: LoraModel, slot: int) -> dict | None:
    """The weights a request of `slot` samples with (None: the base model)."""
    return None if slot == BASE_SLOT else model.adapter_weights(slot) or None


def validate(spec: SampleSpec, model: LoraModel) -> None:
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


def prompt_outputs(spec: SampleSpec, logits: torch.Tensor, seed: int) -> PromptOut:
    """What `spec` asks of its prompt, from the prefill logits of its positions [L, V].
    Row i of the log-softmax predicts prompt[i + 1]."""
    out = PromptOut()
    if not spec.scores_prompt:
        return out
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [L-1, V]
    skip = len(spec.prompt) - 1 - (spec.prompt_logprobs_last_n or len(spec.prompt) - 1)
    if spec.prompt_logprobs:
        targets = torch.tensor(spec.prompt[1:], device=logp.device, dtype=torch.long)
        scored = logp.gather(-1, targets[:, None]).squeeze(-1).tolist()
        out.logprobs = [math.nan] * (1 + skip) + scored[skip:]
    if (k := spec.topk_prompt_logprobs) > 0:
        vals, ids = logp.topk(k, dim=-1)  # [L-1, k]
        topk_ids = np.zeros((len(spec.prompt), k), dtype=np.int32)
        topk_lp = np.full((len(spec.prompt), k), EMPTY_TOPK_LOGPROB, dtype=np.float32)
        topk_ids[1 + skip:] = ids[skip:].cpu().numpy()
        topk_lp[1 + skip:] = vals[skip:].cpu().numpy()
        out.topk = (topk_ids, topk_lp)
    if spec.target_prompt is not None:
        ids = torch.tensor(spec.target_prompt["ids"], device=logp.device, dtype=torch.long)
        values = logp.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)
        out.target = (values.cpu().numpy().astype(np.float32), spec.target_prompt["layout"])
    if (k := spec.prompt_alt_tokens_k) > 0:
        out.alt = _alternatives(logits[:-1].float(), logp, k, spec.temperature, seed)
    return out


def _alternatives(logits: torch.Tensor, logp: torch.Tensor, k: int, temperature: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k independent draws per prompt position at `temperature` (0: the argmax k times), and
    their raw-model logprobs, as the sampled tokens' are."""
    if temperature == 0:
        tokens = logits.argmax(-1, keepdim=True).expand(-1, k)
    else:
        gen = torch.Generator(device=logits.device).manual_seed(seed)
        probs = torch.softmax(logits / temperature, dim=-1)
        tokens = torch.multinomial(probs, k, replacement=True, generator=gen)
    chosen = logp.gather(-1, tokens)
    return tokens.cpu().numpy().astype(np.int64), chosen.cpu().numpy().astype(np.float32)


def sampled_topk(model: LoraModel, spec: SampleSpec, tokens: list[int]
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """The top `spec.topk_sample_logprobs` of the model's distribution at each sampled
    position, from one forward over prompt + sample on the request's adapter (the decode
    step keeps only the chosen token's log-prob; a request that asks pays this pass)."""
    if not tokens:
        return None
    ids = torch.tensor([spec.prompt + tokens[:-1]], device=model.device)
    with torch.no_grad():
        logits, _ = model.forward_logits(ids, torch.ones_like(ids), [spec.slot])
    logp = torch.log_softmax(logits[0, len(spec.prompt) - 1:].float(), dim=-1)  # [n, V]
    values, top = logp.topk(spec.topk_sample_logprobs, dim=-1)
    return top.int().cpu().numpy(), values.cpu().numpy()


def outcome(result: Any, seconds: float) -> Outcome:
    """A finished request's answer: its protobuf, or its error (`user` for bad input)."""
    if isinstance(result, UserError):
        return Outcome.fail(str(result), "user")
    if isinstance(result, Exception):
        return Outcome.fail(f"{type(result).__name__}: {result}", "server")
    sequences = [WireSequence(s.tokens, s.logprobs, s.stop_reason, s.topk)
                 for s in result.sequences]
    prompt = result.prompt
    proto = encode_sample_response(sequences, prompt.logprobs, prompt.topk, prompt.target,
                                   prompt.alt, prompt.cache_hit_tokens)
    return Outcome(proto=proto, compute_seconds=seconds)
