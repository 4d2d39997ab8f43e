"""Packed training passes: many sequences as one token stream, no compute on padding.

A tick's sequences (of any adapters) are laid end to end in one stream of T tokens, sorted
by adapter slot so that every adapter owns one contiguous run of tokens. Positions restart
at each sequence; attention is causal inside each sequence and never crosses into another
(no padding, no [T, T] mask). Two ways through the decoder layers:

  - `fastpath` (Qwen3 / Qwen2 / Llama layers): one variable-length flash-attention call
    over the stream on CUDA, fused element-wise kernels; the default when it fits.
  - the transformers modules, with the "tinkerq" attention hook registered below: with a
    pack active it runs one scaled-dot-product call per sequence, otherwise it is plain
    SDPA (the sampler's padded, cached batches go through it unchanged).

The loss side (`fused_head`) never holds the whole [T, vocab] logits: the LM head,
log-softmax, target gather, loss and that chunk's backward run `chunk_tokens` positions at
a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from workers.lora import LoraRouter, segment_ends
from workers.parallel import tp
from workers.training import fastpath

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
    segment_ends: torch.Tensor  # [len(segments)] int32 on the device (grouped LoRA matmuls)
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
    return Pack(stream(tokens), stream(targets), positions, cu, segments,
                segment_ends(segments, device), order)


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
    hf: torch.nn.Module, router: LoraRouter, pack: Pack, checkpoint_layers: bool,
    fast: bool = False,
) -> torch.Tensor:
    """The final-norm hidden states [T, H] of the stream. `fast`: through `fastpath`'s
    layer functions (varlen flash attention, fused element-wise kernels) rather than the
    transformers modules with the per-sequence attention hook."""
    body = hf.model
    if fast:
        return _fast_hidden_states(body, router, pack, checkpoint_layers)
    h = body.embed_tokens(pack.tokens[None])  # [1, T, H]
    position_ids = pack.positions[None]
    rotary = body.rotary_emb(h, position_ids)
    for layer in body.layers:
        h = _maybe_checkpoint(checkpoint_layers, _run_layer, layer, h, position_ids, rotary,
                              pack, router)
    return body.norm(h)[0]


def _maybe_checkpoint(enabled: bool, fn, *args) -> torch.Tensor:
    """fn(*args), recomputed in the backward pass instead of saved when `enabled`."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _run_layer(layer, h, position_ids, rotary, pack: Pack, router: LoraRouter) -> torch.Tensor:
    # The pack and routing are set here, not around the caller, so that a checkpointed
    # layer recomputed during backward sees them too.
    with active(pack), router.route_segments(pack.segments, pack.segment_ends):
        out = layer(h, attention_mask=None, position_ids=position_ids,
                    position_embeddings=rotary)
    return out[0] if isinstance(out, tuple) else out


def _fast_hidden_states(body, router: LoraRouter, pack: Pack, checkpoint_layers: bool):
    h = body.embed_tokens(pack.tokens)  # [T, H]
    cos, sin = body.rotary_emb(h[None], pack.positions[None])
    cos, sin = cos[0], sin[0]  # [T, D]
    attention = fastpath.VarlenAttention(pack.cu_seqlens, h.device)
    for layer in body.layers:
        h = _maybe_checkpoint(checkpoint_layers, _run_fast_layer, layer, h, cos, sin, attention,
                              pack, router)
    return fastpath.KERNELS.rms_norm(h, body.norm.weight, body.norm.variance_epsilon)


def _run_fast_layer(layer, h, cos, sin, attention, pack: Pack, router: LoraRouter):
    # Inside the layer function, for checkpoint recompute (above).
    with router.route_segments(pack.segments, pack.segment_ends):
        return fastpath.layer_forward(layer, h, cos, sin, attention)


# A row's loss for one run of its tokens: (caller's row index, offset of the run in the row,
# log-probs of the run [n]) -> per-token losses [n]. Losses must be element-wise in the
# log-probs (every Tinker loss is), so a row cut across chunks gets the same numbers.
RowLoss = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class HeadResult:
    logprobs: list[torch.Tensor]  # per caller row, [N_i] fp32, detached
    losses: list[torch.Tensor]  # per caller row, [N_i] fp32, detached
    grad_h: torch.Tensor | None  # d(loss of the rows that train) / d(hidden states) [T, H]
    head_grads: dict[int, torch.Tensor]  # id(LM-head LoRA parameter) -> its gradient


def fused_head(
    lm_head, h: torch.Tensor, pack: Pack, chunk_tokens: int, row_loss: RowLoss,
    trains: list[bool], head_params: list[torch.Tensor],
) -> HeadResult:
    """LM head, log-softmax, target gather and loss, `chunk_tokens` positions at a time,
    with each chunk's backward run at once, while its logits exist.

    The loss is element-wise, so a chunk's gradient with respect to its hidden states is
    known as soon as its log-probs are: nothing of the [chunk, vocab] logits outlives the
    chunk, and the LM head's matmul runs twice per token (forward, input gradient) instead
    of three times (forward, recompute under checkpointing, input gradient). `grad_h` is
    then pushed through the decoder layers by the caller. `head_params`: the LM-head LoRA
    leaves of the adapters that train (their gradients come back in `head_grads`).
    """
    n_rows = len(pack.order)
    lp_parts: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
    loss_parts: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
    any_train = any(trains)
    grad_h = torch.zeros_like(h) if any_train else None
    head_grads: dict[int, torch.Tensor] = {}
    cu = pack.cu_seqlens
    for start in range(0, pack.num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, pack.num_tokens)
        segments = [(slot, max(s, start) - start, min(e, end) - start)
                    for slot, s, e in pack.segments if s < end and e > start]
        hc = h[start:end].detach().requires_grad_(any_train)
        total = None
        with torch.set_grad_enabled(any_train):
            lp = chunk_logprobs(lm_head, hc, pack.targets[start:end], segments)
            for k in range(n_rows):
                s, e = max(cu[k], start), min(cu[k + 1], end)
                if s >= e:
                    continue
                i = pack.order[k]
                piece = lp[s - start : e - start]
                loss = row_loss(i, s - cu[k], piece)
                lp_parts[k].append(piece.detach())
                loss_parts[k].append(loss.detach())
                if trains[i]:
                    total = loss.sum() if total is None else total + loss.sum()
        if total is not None and total.requires_grad:
            grads = torch.autograd.grad(total, [hc, *head_params], allow_unused=True)
            if grads[0] is not None and grad_h is not None:
                grad_h[start:end] = grads[0]
            for p, g in zip(head_params, grads[1:], strict=True):
                if g is not None:
                    head_grads[id(p)] = g if id(p) not in head_grads else head_grads[id(p)] + g
    logprobs: list[torch.Tensor] = [torch.empty(0)] * n_rows
    losses: list[torch.Tensor] = [torch.empty(0)] * n_rows
    for k, i in enumerate(pack.order):
        logprobs[i] = torch.cat(lp_parts[k]).float()
        losses[i] = torch.cat(loss_parts[k]).float()
    return HeadResult(logprobs, losses, grad_h, head_grads)


def head_logprobs(lm_head, h: torch.Tensor, pack: Pack, chunk_tokens: int
                  ) -> list[torch.Tensor]:
    """log p(target) per caller row ([N_i] fp32), without gradients: what a loss that needs a
    whole datum's log-probs before any token's (gspo's sequence ratio) reads first."""
    with torch.no_grad():
        lp = torch.cat([
            chunk_logprobs(lm_head, h[s:e], pack.targets[s:e],
                           [(slot, max(a, s) - s, min(b, e) - s)
                            for slot, a, b in pack.segments if a < e and b > s])
            for s, e in ((s, min(s + chunk_tokens, pack.num_tokens))
                         for s in range(0, pack.num_tokens, chunk_tokens))
        ]).float()
    cu = pack.cu_seqlens
    out: list[torch.Tensor] = [torch.empty(0)] * len(pack.order)
    for k, i in enumerate(pack.order):
        out[i] = lp[cu[k]:cu[k + 1]]
    return out


def chunk_logprobs(lm_head, h: torch.Tensor, targets: torch.Tensor, segments) -> torch.Tensor:
    """log p(target) [C] fp32 for C positions: one [C, vocab] logits tensor at a time (under
    tensor parallelism [C, vocab/N] per rank, combined by `tp.vocab_logprobs`)."""
    logits = lm_head.forward_segments(h, segments)
    if tp.active(lm_head.tp):
        return tp.vocab_logprobs(logits, targets, lm_head.tp_span[0], lm_head.tp)
    return fastpath.KERNELS.target_logprobs(logits, targets)
