"""The training pass's own decoder-layer forward for Qwen3 / Qwen2 / Llama layers.

`packed.hidden_states` runs the packed stream [T, hidden] through these functions instead of
the transformers modules when `supported(hf)` says the layers fit. The weights are the
transformers modules' own (and the projections are still the `MultiLoraLinear` wrappers);
only the glue between the matmuls is ours, for two reasons:

  - Attention is one variable-length flash-attention call over the whole stream on CUDA
    (`aten._flash_attention_forward` with cumulative sequence lengths: causal inside each
    sequence, never across, grouped-query heads taken as they are), instead of one kernel
    per sequence over K/V expanded to every query head.
  - The element-wise work between the matmuls (RMSNorm in fp32, q/k norm + RoPE, SiLU·up,
    residual add + norm) is a handful of small functions that `compile_kernels()` hands to
    torch.compile (Inductor, dynamic shapes: one graph for every stream length). Each then
    runs as one fused kernel forward and one backward instead of 5-10 eager kernels that
    each read and write the whole activation. On the CPU they stay eager by default.

The math is transformers' own, written out (tests compare the two paths on a tiny model):
  RMSNorm(x) = w · (x_f32 · rsqrt(mean(x_f32²) + eps)).to(dtype)
  RoPE(x) = x · cos + rotate_half(x) · sin, with transformers' cos/sin for the positions
  MLP(x) = down(silu(gate(x)) · up(x))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


# --- element-wise pieces (eager; `compile_kernels` swaps in compiled versions) --------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after `h + delta`, and its norm for the next block."""
    s = h + delta
    return s, rms_norm(s, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D]: Qwen3's per-head q/k RMSNorm (when weights are given),
    then RoPE with cos/sin [T, D]."""
    if q_weight is not None and k_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits.float())[t, targets[t]] without a [C, V] log-softmax tensor;
    targets [C] give [C], targets [C, K] (K candidates per position) give [C, K]."""
    logits = logits.float()
    picked = logits.gather(-1, targets.view(targets.shape[0], -1))
    lp = picked - torch.logsumexp(logits, dim=-1, keepdim=True)
    return lp if targets.dim() == 2 else lp[:, 0]


@dataclass
class Kernels:
    rms_norm: object = rms_norm
    add_rms_norm: object = add_rms_norm
    qk_rope: object = qk_rope
    silu_mul: object = silu_mul
    target_logprobs: object = target_logprobs
    compiled: bool = False


KERNELS = Kernels()


def compile_kernels() -> None:
    """Swap the element-wise pieces for torch.compile'd ones (once per process)."""
    if KERNELS.compiled:
        return
    for name in ("rms_norm", "add_rms_norm", "qk_rope", "silu_mul", "target_logprobs"):
        setattr(KERNELS, name, torch.compile(globals()[name], dynamic=True))
    KERNELS.compiled = True
    log.info("training-pass element-wise kernels compiled with torch.compile (dynamic shapes)")


# --- which models fit ---------------------------------------------------------------------
def supported(hf: torch.nn.Module) -> bool:
    """True when every decoder layer is a pre-norm attention + SiLU-gated MLP block that
    these functions reproduce exactly (no sliding window, no other activation)."""
    config = hf.config
    if getattr(config, "hidden_act", None) != "silu":
        return False
    for layer in hf.model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "sliding_window", None) is not None:
            return False
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm",
                                               "mlp")):
            return False
    return True


# --- attention ------------------------------------------------------------------------------
class VarlenAttention:
    """Causal attention inside each sequence of a packed stream. With `kv_index`, row r's
    keys are the stream positions kv_index[cu_keys[r]:cu_keys[r + 1]] (a shared prefix of
    another row's, then its own) and its queries the last of them: causal from the bottom
    right, as flash attention aligns it."""

    def __init__(self, cu_seqlens: list[int], device: torch.device,
                 cu_keys: list[int] | None = None, kv_index: torch.Tensor | None = None):
        self.cu, self.cu_k = cu_seqlens, cu_keys or cu_seqlens
        self.kv_index = kv_index
        self.cu_tensor = torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
        self.cu_k_tensor = (self.cu_tensor if kv_index is None else
                            torch.tensor(self.cu_k, dtype=torch.int32, device=device))
        self.max_len = _longest(self.cu)
        self.max_k = _longest(self.cu_k)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]."""
        if self.kv_index is not None:  # differentiable: the shared keys sum their gradients
            k, v = k.index_select(0, self.kv_index), v.index_select(0, self.kv_index)
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._flash_attention_forward(
                q, k, v, self.cu_tensor, self.cu_k_tensor, self.max_len, self.max_k, 0.0,
                True, False, scale=scale,
            )[0]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
        out = []
        for s, e, ks, ke in zip(self.cu[:-1], self.cu[1:], self.cu_k[:-1], self.cu_k[1:],
                                strict=True):
            extra = (ke - ks) - (e - s)  # keys before the row's first query
            mask = (None if extra == 0 else
                    torch.ones(e - s, ke - ks, dtype=torch.bool, device=q.device).tril(extra))
            out.append(F.scaled_dot_product_attention(
                q[None, :, s:e], k[None, :, ks:ke], v[None, :, ks:ke], attn_mask=mask,
                is_causal=mask is None, scale=scale)[0])
        return torch.cat(out, dim=1).transpose(0, 1)


def _longest(cu: list[int]) -> int:
    return max(e - s for s, e in zip(cu[:-1], cu[1:], strict=True))


# --- one decoder layer ------------------------------------------------------------------------
def layer_forward(
    layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    attention: VarlenAttention,
) -> torch.Tensor:
    """h [T, hidden] -> h [T, hidden] through one pre-norm decoder layer. The projections
    are called as modules, so LoRA routing applies."""
    k_ = KERNELS
    attn, mlp = layer.self_attn, layer.mlp
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    T, D = h.shape[0], attn.head_dim
    x = k_.rms_norm(h, ln1.weight, ln1.variance_epsilon)
    q = attn.q_proj(x).view(T, -1, D)
    k = attn.k_proj(x).view(T, -1, D)
    v = attn.v_proj(x).view(T, -1, D)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    eps = q_norm.variance_epsilon if q_norm is not None else 0.0
    q, k = k_.qk_rope(q, k, None if q_norm is None else q_norm.weight,
                      None if k_norm is None else k_norm.weight, eps, cos, sin)
    o = attn.o_proj(attention(q, k, v, attn.scaling).reshape(T, -1))
    h, x = k_.add_rms_norm(h, o, ln2.weight, ln2.variance_epsilon)
    return h + mlp.down_proj(k_.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
