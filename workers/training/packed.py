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

Shared prefixes (`make_pack(..., share=True)`, the fast path only): a row whose first L
tokens and targets equal those of an earlier row of the same adapter (the samples of one RL
prompt) is laid down without them. Its tokens attend to the earlier row's keys for those
positions (the attention's keys are gathered per row, `Pack.kv_index`), its positions go on
from L, and its log-probs and losses for them are read off the earlier row's (`Pack.views`),
so the shared tokens run through the layers and the LM head once. Gradients are those of
the unshared pass: each row's loss at a shared position is its own function of the one
log-prob there, and the shared keys collect every row's attention gradient.

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


MIN_SHARED = 16  # shorter common prefixes are recomputed: gathering keys costs more


@dataclass
class Pack:
    """Sequences laid end to end. `order[i]` = index in the caller's list of packed row i."""

    tokens: torch.Tensor  # [T] long
    targets: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, 0.. per sequence (L.. for a row that shares L)
    cu_seqlens: list[int]  # [N + 1] sequence boundaries in the stream
    segments: list[tuple[int, int, int]]  # (slot, start, end): one token run per adapter
    segment_ends: torch.Tensor  # [len(segments)] int32 on the device (grouped LoRA matmuls)
    order: list[int]
    # per packed row, its positions in row order: (stream start, stream end, offset in the row)
    views: list[list[tuple[int, int, int]]]
    cu_keys: list[int]  # [N + 1] boundaries of each row's keys (= cu_seqlens: no sharing)
    kv_index: torch.Tensor | None  # [keys] stream position of each key; None: no sharing

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def shared_tokens(self) -> int:
        """Row positions not in the stream: read off another row's."""
        return sum(v[-1][2] for v in self.views)


def make_pack(
    tokens: list[list[int]], targets: list[list[int]], slots: list[int], device: torch.device,
    share: bool = False,
) -> Pack:
    """The stream of the rows, sorted by slot. `share`: a row drops a prefix it has in
    common with an earlier row of its slot (tokens and targets, at least MIN_SHARED)."""
    shares = _shared_prefixes(tokens, targets, slots) if share else {}
    sharers: dict[int, list[int]] = {}
    for c, (p, _) in shares.items():
        sharers.setdefault(p, []).append(c)
    order = []
    for i in sorted(range(len(tokens)), key=lambda i: slots[i]):  # stable: request order
        if i not in shares:  # a row that shares comes right after the row it shares with
            order += [i, *sharers.get(i, [])]
    skip = [shares[i][1] if i in shares else 0 for i in order]
    cu, segments = [0], []
    for k, i in enumerate(order):
        start = cu[-1]
        cu.append(start + len(tokens[i]) - skip[k])
        if segments and segments[-1][0] == slots[i]:
            segments[-1] = (slots[i], segments[-1][1], cu[-1])
        else:
            segments.append((slots[i], start, cu[-1]))
    packed_index = {i: k for k, i in enumerate(order)}
    views = []
    for k, i in enumerate(order):
        own = (cu[k], cu[k + 1], skip[k])
        if i in shares:
            p = cu[packed_index[shares[i][0]]]
            views.append([(p, p + skip[k], 0), own])
        else:
            views.append([own])
    cu_keys, kv_index = cu, None
    if shares:
        ranges = [torch.arange(s, e) for v in views for s, e, _ in v]
        kv_index = torch.cat(ranges).to(device)
        cu_keys = [0]
        for v in views:
            cu_keys.append(cu_keys[-1] + sum(e - s for s, e, _ in v))

    def stream(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([t for k, i in enumerate(order) for t in rows[i][skip[k]:]],
                            dtype=torch.long, device=device)

    positions = torch.cat([torch.arange(skip[k], len(tokens[i]))
                           for k, i in enumerate(order)]).to(device)
    return Pack(stream(tokens), stream(targets), positions, cu, segments,
                segment_ends(segments, device), order, views, cu_keys, kv_index)


def _shared_prefixes(tokens, targets, slots) -> dict[int, tuple[int, int]]:
    """row -> (earlier row of its slot, length of the prefix they share), for the rows that
    share at least MIN_SHARED positions; a row that shares is never shared with (one level),
    and keeps at least its last position."""
    heads: dict[tuple, list[int]] = {}  # (slot, first MIN_SHARED tokens) -> rows shared with
    shares = {}
    for i in range(len(tokens)):
        if len(tokens[i]) <= MIN_SHARED:
            continue
        key = (slots[i], tuple(tokens[i][:MIN_SHARED]))
        best, length = -1, 0
        for p in heads.get(key, []):
            n = _common_length(tokens[p], tokens[i], targets[p], targets[i])
            if n > length:
                best, length = p, n
        length = min(length, len(tokens[i]) - 1)
        if length >= MIN_SHARED:
            shares[i] = (best, length)
        else:
            heads.setdefault(key, []).append(i)
    return shares


def _common_length(a: list, b: list, ya: list, yb: list) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k] and ya[k] == yb[k]:
        k += 1
    return k


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
    attention = fastpath.VarlenAttention(pack.cu_seqlens, h.device, pack.cu_keys,
                                         pack.kv_index)
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
    for start in range(0, pack.num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, pack.num_tokens)
        segments = [(slot, max(s, start) - start, min(e, end) - start)
                    for slot, s, e in pack.segments if s < end and e > start]
        hc = h[start:end].detach().requires_grad_(any_train)
        total = None
        with torch.set_grad_enabled(any_train):
            lp = chunk_logprobs(lm_head, hc, pack.targets[start:end], segments)
            for k, i in enumerate(pack.order):
                for vs, ve, offset in pack.views[k]:  # a row's views are in stream order
                    s, e = max(vs, start), min(ve, end)
                    if s >= e:
                        continue
                    piece = lp[s - start : e - start]
                    loss = row_loss(i, offset + s - vs, piece)
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
    out: list[torch.Tensor] = [torch.empty(0)] * len(pack.order)
    for k, i in enumerate(pack.order):
        out[i] = torch.cat([lp[s:e] for s, e, _ in pack.views[k]])
    return out


def chunk_logprobs(lm_head, h: torch.Tensor, targets: torch.Tensor, segments) -> torch.Tensor:
    """log p(target) [C] fp32 for C positions: one [C, vocab] logits tensor at a time (under
    tensor parallelism [C, vocab/N] per rank, combined by `tp.vocab_logprobs`)."""
    logits = lm_head.forward_segments(h, segments)
    if tp.active(lm_head.tp):
        return tp.vocab_logprobs(logits, targets, lm_head.tp_span[0], lm_head.tp)
    return fastpath.KERNELS.target_logprobs(logits, targets)
