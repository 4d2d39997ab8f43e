"""Tensor parallelism: one function shards a LoraModel over a process group, from one plan.

`apply_tp(model, tp)` cuts every projection of the base model by the plan table below; the
model code stays TP-agnostic apart from the collectives its layers call through `tp`:

  col    q/k/v/gate/up: the weight's output rows are split (heads go with them); the input
         passes `copy_to` (identity forward, gradient summed over ranks)
  row    o/down: the weight's input columns are split; the output passes `reduce_from`
         (summed over ranks forward, gradient unchanged)
  vocab  embed_tokens / lm_head: vocabulary rows are split; the lookup is summed, the LM
         head's log-softmax runs over the shards (`vocab_logprobs`), the sampler gathers the
         logits (`gather_vocab`)

LoRA under TP. A col (or vocab) layer keeps A [r, in] replicated and shards B on its output
dimension, B [out/N, r]; a row layer shards A on its input dimension, A [r, in/N], and
keeps B [out, r] replicated. The LoRA delta is added before a row layer's sum, so one
collective per layer carries both. A replicated factor feeds only this rank's part of the
outputs, so its gradient on each rank is partial: `reduce_grads` sums it over the ranks
before the optimizer runs; the optimizer state of each factor is laid out like the factor.
New adapters draw the full matrices from the same generator as on one GPU and keep their
shard, and checkpoints hold the full matrices (`full_adapter` / `shard_adapter`), so
neither depends on N.

Loading (`LoraModel.load` with a group): the model is built on the meta device, `apply_tp`
cuts the empty shapes and returns which part of each tensor this rank keeps, and
`load_shards` reads just those parts from the safetensors files onto the rank's device.

N = 1 (or `tp` None) runs exactly the single-GPU code: every helper is then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

PLAN = {"q_proj": "col", "k_proj": "col", "v_proj": "col", "gate_proj": "col", "up_proj": "col",
        "o_proj": "row", "down_proj": "row", "lm_head": "vocab"}


@dataclass(frozen=True)
class TP:
    """This rank's place in the tensor-parallel group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def span(self, n: int, what: str) -> tuple[int, int]:
        """[lo, hi) of this rank's equal share of n rows."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={self.size}")
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step


def active(tp: TP | None) -> bool:
    return tp is not None and tp.size > 1


# --- collectives (autograd-aware where training needs them) ---------------------------------
class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to(x: torch.Tensor, tp: TP | None) -> torch.Tensor:
    """A replicated input entering a col layer: its gradient is summed over the ranks."""
    if not active(tp) or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _CopyTo.apply(x, tp.group)  # type: ignore[union-attr]


def reduce_from(x: torch.Tensor, tp: TP | None) -> torch.Tensor:
    """Partial sums leaving a row layer (or the vocab-split embedding): summed over ranks."""
    if not active(tp):
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReduceFrom.apply(x, tp.group)  # type: ignore[union-attr]
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)  # type: ignore[union-attr]
    return x


def gather_vocab(logits: torch.Tensor, tp: TP | None) -> torch.Tensor:
    """[N, V/n] shards -> [N, V] on every rank (sampling; no gradient)."""
    if not active(tp):
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp.size)]  # type: ignore[union-attr]
    dist.all_gather(parts, logits.contiguous(), group=tp.group)  # type: ignore[union-attr]
    return torch.cat(parts, dim=-1)


def vocab_logprobs(logits: torch.Tensor, targets: torch.Tensor, lo: int,
                   tp: TP) -> torch.Tensor:
    """log p(target) fp32 ([C], or [C, K] for K targets per position) from this rank's
    logits shard [C, V/n] (vocabulary rows [lo, lo + V/n)): the max, the sum of exponentials
    and the targets' logits are combined over the ranks, so no rank holds the whole
    vocabulary."""
    x = logits.float()
    top = x.detach().amax(-1, keepdim=True)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp.group)
    total = reduce_from((x - top).exp().sum(-1, keepdim=True), tp)
    ids = targets.view(targets.shape[0], -1)
    mine = (ids >= lo) & (ids < lo + x.shape[-1])
    local = (ids - lo).clamp(0, x.shape[-1] - 1)
    picked = reduce_from(x.gather(-1, local) * mine, tp)
    lp = picked - top - total.log()
    return lp if targets.dim() == 2 else lp[:, 0]


# --- sharding ---------------------------------------------------------------------------------
class VocabEmbedding(nn.Module):
    """An embedding table split by vocabulary rows: ids outside this rank's rows look up
    zeros, and the ranks' lookups are summed."""

    def __init__(self, weight: nn.Parameter, lo: int, tp: TP):
        super().__init__()
        self.weight = weight  # [V/n, H]; the same Parameter as a tied LM head's
        self.lo, self.tp = lo, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        mine = (ids >= self.lo) & (ids < self.lo + n)
        out = F.embedding((ids - self.lo).clamp(0, n - 1), self.weight)
        return reduce_from(out * mine[..., None].to(out.dtype), self.tp)


def apply_tp(model, tp: TP) -> dict[int, tuple[int, int, int] | None]:
    """Shard `model` (a LoraModel, before any adapter exists) for this rank, in place.

    Works on real weights (cut in place) and on the meta device (only the shapes change).
    Returns, by id() of each parameter it cut, the part of the full tensor this rank keeps:
    (dim, lo, hi), or None for a tensor this rank holds as zeros (a row layer's bias off
    rank 0); `load_shards` reads exactly those parts from a checkpoint."""
    if not active(tp):
        return {}
    if model.adapters:
        raise RuntimeError("apply_tp runs before adapters are added")
    body, done = model.hf.model, {}
    embed = body.embed_tokens
    lo, hi = tp.span(embed.weight.shape[0], "vocab_size")
    _narrow(embed.weight, 0, lo, hi, done)
    body.embed_tokens = VocabEmbedding(embed.weight, lo, tp)
    for name, layer in model.layers.items():
        style = PLAN[name.rsplit(".", 1)[-1]]
        base, dim = layer.base, 1 if style == "row" else 0
        full_in, full_out = base.in_features, base.out_features
        lo, hi = tp.span(full_in if dim else full_out,  # (a tied head is already cut)
                         f"{name} {'in' if dim else 'out'}_features")
        _narrow(base.weight, dim, lo, hi, done)
        if base.bias is not None:
            if style == "row":  # added once, after the sum
                if tp.rank:
                    base.bias.data = torch.zeros_like(base.bias)
                done[id(base.bias)] = None if tp.rank else (0, 0, base.bias.shape[0])
            else:
                _narrow(base.bias, 0, lo, hi, done)
        base.in_features, base.out_features = base.weight.shape[1], base.weight.shape[0]
        layer.tp, layer.tp_style, layer.tp_span = tp, style, (lo, hi)
        layer.full_features = (full_in, full_out)
    _check_heads(model, tp)
    model.tp, model.rank = tp, tp.rank  # (Executor.build sets the worker-wide rank)
    return done


def _narrow(p: torch.Tensor, dim: int, lo: int, hi: int,
            done: dict[int, tuple[int, int, int] | None]) -> None:
    if id(p) in done:  # a tied weight, already cut
        return
    p.data = p.data.narrow(dim, lo, hi - lo).contiguous()
    done[id(p)] = (dim, lo, hi)


def load_shards(model, folder, parts: dict[int, tuple[int, int, int] | None],
                device: torch.device) -> None:
    """Fill a model built on the meta device (and cut by `apply_tp`, which gave `parts`)
    from the safetensors files in `folder`, reading for each tensor only this rank's part:
    no rank ever holds the whole model, on the CPU or the GPU. Buffers computed at build
    time (the rotary frequencies) are computed again on `device`."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            where = dict.fromkeys(f.keys(), "model.safetensors")
    hf = model.hf
    names = {id(p): n for n, p in hf.named_parameters()}  # a tied weight: its first name
    files: dict[str, object] = {}

    def read(param: torch.Tensor) -> torch.Tensor:
        key = names[id(param)].replace(".base.", ".")  # MultiLoraLinear holds the Linear
        out = torch.empty(param.shape, dtype=param.dtype, device=device)
        if id(param) in parts and parts[id(param)] is None:
            return out.zero_()
        if key not in where:
            raise ValueError(f"{folder} holds no tensor {key!r}")
        if where[key] not in files:
            files[where[key]] = safe_open(folder / where[key], "pt")
        f = files[where[key]]
        if id(param) in parts:
            dim, lo, hi = parts[id(param)]  # type: ignore[misc]
            value = f.get_slice(key)[(slice(None),) * dim + (slice(lo, hi),)]  # type: ignore
        else:  # replicated (norms)
            value = f.get_tensor(key)  # type: ignore[attr-defined]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{key}: {tuple(value.shape)} in {folder}, but this rank's part "
                             f"is {tuple(param.shape)}")
        return out.copy_(value)

    made: dict[int, nn.Parameter] = {}  # one real tensor per meta one, so ties stay tied
    for module in hf.modules():
        for pname, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(read(param), requires_grad=False)
                module._parameters[pname] = made[id(param)]
    for parent in list(hf.modules()):  # buffers computed at build time: again, for real
        for child, module in list(parent.named_children()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                with torch.device(device):
                    setattr(parent, child, type(module)(config=hf.config))
    left = [n for n, b in hf.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"buffers {left} have no rule for a sharded load")


def _check_heads(model, tp: TP) -> None:
    config = model.config
    for what in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(config, what)
        if n % tp.size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={tp.size}")


# --- adapters ---------------------------------------------------------------------------------
def replicated(layer, factor: str) -> bool:
    """Whether LoRA factor "A" or "B" of `layer` is whole on every rank."""
    style = getattr(layer, "tp_style", None)
    return style is None or (factor == "A") != (style == "row")


def shard_factor(layer, factor: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full A [r, in] or B [out, r]."""
    if getattr(layer, "tp_style", None) is None or replicated(layer, factor):
        return full
    lo, hi = layer.tp_span
    return full[:, lo:hi] if factor == "A" else full[lo:hi]


def full_factor(layer, factor: str, part: torch.Tensor) -> torch.Tensor:
    """The whole matrix from every rank's part (a collective: every rank calls it)."""
    if getattr(layer, "tp_style", None) is None or replicated(layer, factor):
        return part
    tp = layer.tp
    parts = [torch.empty_like(part) for _ in range(tp.size)]
    dist.all_gather(parts, part.contiguous(), group=tp.group)
    return torch.cat(parts, dim=1 if factor == "A" else 0)


def full_tensors(layers: list, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole tensors laid out like an adapter's parameters (A, B, A, B, ... with
    `layers[i]` the layer of `parts[i]`): optimizer moments for a checkpoint."""
    return [full_factor(layer, "AB"[i % 2], t) for i, (layer, t) in
            enumerate(zip(layers, parts, strict=True))]


def shard_tensors(layers: list, whole: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's parts of whole tensors laid out like an adapter's parameters."""
    return [shard_factor(layer, "AB"[i % 2], t).contiguous() for i, (layer, t) in
            enumerate(zip(layers, whole, strict=True))]


def reduce_grads(layers: list, grads: list[torch.Tensor | None]) -> None:
    """Sum, over the ranks and in place, the gradients of replicated factors. `layers[i]`
    and `grads[i]` pair up as (layer of A, A's grad), (layer of B, B's grad), ..."""
    tp = next((getattr(x, "tp", None) for x in layers), None)
    if not active(tp):
        return
    todo = [g for i, (layer, g) in enumerate(zip(layers, grads, strict=True))
            if g is not None and replicated(layer, "AB"[i % 2])]
    if todo:
        flat = torch.cat([g.reshape(-1) for g in todo])
        dist.all_reduce(flat, group=tp.group)  # type: ignore[union-attr]
        torch._foreach_copy_(todo, [t.view_as(g) for t, g in zip(
            flat.split([g.numel() for g in todo]), todo, strict=True)])


def grad_norm(layers: list, grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of an adapter's gradients as on one GPU: shards' squares summed
    over the ranks, replicated factors counted once."""
    squares = torch.stack([g.float().pow(2).sum() for g in grads])
    tp = next((getattr(x, "tp", None) for x in layers), None)
    if not active(tp):
        return squares.sum().sqrt()
    whole = torch.tensor([replicated(layer, "AB"[i % 2]) for i, layer in enumerate(layers)],
                         device=squares.device)
    sharded = squares[~whole].sum()
    dist.all_reduce(sharded, group=tp.group)  # type: ignore[union-attr]
    return (sharded + squares[whole].sum()).sqrt()


def agree_min(value: int, tp: TP | None) -> int:
    """The smallest of the ranks' values (sizes derived from each GPU's free memory)."""
    if tp is None or tp.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(tp.group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())
