"""Packed training passes: many sequences as one token stream, no compute on padding.

A tick's sequences (of any adapters) are laid end to end in one stream [1, T], sorted by
adapter slot so that every adapter owns one contiguous run of tokens. Positions restart at
each sequence; attention is causal inside each sequence and never crosses into another
(one scaled-dot-product call per sequence on the stream's slices: no padding, no [T, T]
mask). The loss side never holds the whole [T, vocab] logits: the LM head, log-softmax and
target gather run chunk by chunk under activation checkpointing, so at most
`chunk_tokens × vocab` fp32 logits exist at once, in the forward and in the backward.

The attention hook is registered with transformers as the "tinkerq" implementation: with a
pack active it runs the per-sequence attention, otherwise it is plain SDPA (the sampler's
padded, cached batches go through it unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from workers.lora import LoraRouter

ATTN_NAME = "tinkerq"
_SDPA = AttentionInterface._global_mapping["sdpa"]
_active: list[list[int]] = []  # the cu_seqlens of the pack being run (a stack of one)
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Pack:
    """Sequences laid end to end. `order[i]` = index in the caller's list of packed row i."""

    tokens: torch.Tensor  # [T] long
    targets: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, 0.. per sequence
    cu_seqlens: list[int]  # [N + 1] sequence boundaries in the stream
    segments: list[tuple[int, int, int]]  # (slot, start, end): one token run per adapter
    order: list[int]

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]


def make_pack(
    tokens: list[list[int]], targets: list[list[int]], slots: list[int], device: torch.device
) -> Pack:
    order = sorted(range(len(tokens)), key=lambda i: slots[i])  # stable: keeps request order
    cu, segments = [0], []
    for i in order:
        start = cu[-1]
        cu.append(start + len(tokens[i]))
        if segments and segments[-1][0] == slots[i]:
            segments[-1] = (slots[i], segments[-1][1], cu[-1])
        else:
            segments.append((slots[i], start, cu[-1]))

    def stream(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([t for i in order for t in rows[i]], dtype=torch.long, device=device)

    positions = torch.cat([torch.arange(len(tokens[i])) for i in order]).to(device)
    return Pack(stream(tokens), stream(targets), positions, cu, segments, order)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """transformers attention hook: per-sequence causal attention over the active pack."""
    if not _active:
        return _SDPA(module, query, key, value, attention_mask, scaling=scaling,
                     dropout=dropout, **kwargs)
    cu = _active[-1]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: expand once for the whole stream, so the flash kernel can take it
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    with sdpa_kernel(_BACKENDS):  # flash first: cuDNN plans a graph per new length (slow)
        outputs = [
            F.scaled_dot_product_attention(  # [1, H, n, D] for one sequence
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                scale=scaling,
            )
            for s, e in zip(cu[:-1], cu[1:], strict=True)
        ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # [1, T, H, D]


AttentionInterface.register(ATTN_NAME, packed_attention)
AttentionMaskInterface.register(ATTN_NAME, AttentionMaskInterface._global_mapping["sdpa"])


@contextlib.contextmanager
def active(pack: Pack) -> Iterator[None]:
    _active.append(pack.cu_seqlens)
    try:
        yield
    finally:
        _active.pop()


def hidden_states(
    hf: torch.nn.Module, router: LoraRouter, pack: Pack, checkpoint_layers: bool
) -> torch.Tensor:
    """The final-norm hidden states [T, H] of the stream."""
    body = hf.model
    h = body.embed_tokens(pack.tokens[None])  # [1, T, H]
    position_ids = pack.positions[None]
    rotary = body.rotary_emb(h, position_ids)
    for layer in body.layers:
        if checkpoint_layers and torch.is_grad_enabled():
            h = checkpoint(_run_layer, layer, h, position_ids, rotary, pack, router,
                           use_reentrant=False)
        else:
            h = _run_layer(layer, h, position_ids, rotary, pack, router)
    return body.norm(h)[0]


def _run_layer(layer, h, position_ids, rotary, pack: Pack, router: LoraRouter) -> torch.Tensor:
    # The pack and routing are set here, not around the caller, so that a checkpointed
    # layer recomputed during backward sees them too.
    with active(pack), router.route_segments(pack.segments):
        out = layer(h, attention_mask=None, position_ids=position_ids,
                    position_embeddings=rotary)
    return out[0] if isinstance(out, tuple) else out


def chunked_target_logprobs(
    lm_head: torch.nn.Module, h: torch.Tensor, pack: Pack, chunk_tokens: int
) -> torch.Tensor:
    """log p(target_t) for every stream position [T] fp32, `chunk_tokens` logits at a time."""
    out = []
    for start in range(0, pack.num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, pack.num_tokens)
        segments = [(slot, max(s, start) - start, min(e, end) - start)
                    for slot, s, e in pack.segments if s < end and e > start]
        piece = checkpoint(_chunk_logprobs, lm_head, h[start:end], pack.targets[start:end],
                           segments, use_reentrant=False) if torch.is_grad_enabled() else (
            _chunk_logprobs(lm_head, h[start:end], pack.targets[start:end], segments))
        out.append(piece)
    return torch.cat(out)


def _chunk_logprobs(lm_head, h, targets, segments) -> torch.Tensor:
    logits = lm_head.forward_segments(h, segments).float()  # [C, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
