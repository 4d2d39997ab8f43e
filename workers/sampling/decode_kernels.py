"""Triton kernels of the fused decode step: the work between a decode step's matmuls in a
handful of launches per layer instead of a dozen. This module holds what they share (Triton
where it is installed, `available`, `INTERPRET`, `pow2`); the kernels and their launchers
are in epilogue_kernels (qkv_epilogue, add_norm, silu_mul), attention_kernels (attention)
and gemv_kernel (gemv).

A decode step is launch-bound at small batches (each kernel costs a few microseconds
whatever its size) and, at large ones, pays for every pass over [N, hidden] activations.
`forward.decode_fused` runs one layer as 4 matmuls (cuBLAS; the LoRA A rows ride in the
base weight, so each also gives x Aᵀ) and these 4 kernels:

  qkv_epilogue   per (row or block of rows, head): + LoRA B, Qwen3's q/k RMSNorm, RoPE;
                 q to a buffer, K and V straight into the KV cache (no separate write)
  attention      per (row, KV head[, split]): the group's query heads against the row's
                 keys (through its block table), each key read once for the whole group;
                 with splits, a combine kernel merges the partial softmaxes
  add_norm       residual + (o or down output + LoRA B), then the next RMSNorm: per row
                 without LoRA B; with it per (row or block of rows, column block), and the
                 last column block to finish normalises the rows
  silu_mul       per (row or block of rows, column block): (gate + LoRA B) · SiLU times
                 (up + LoRA B)

Steps of a few rows also do their large projections with `gemv_kernel.gemv`: the rows
padded to 16 for one tensor-core dot per block of weight columns, the weight streamed once.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests do that); `tl.dot` then
takes fp32 operands (the interpreter mishandles bf16 ones).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the fused decode step can run on this device: Triton, and on CUDA a GPU
    with bf16 tensor cores (compute capability 8.0, Ampere, or newer)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return INTERPRET


def unsupported(config) -> str | None:
    """Why the fused step's kernels cannot run this model's shapes (None: they can). The
    kernels tile a head in one block (a power of two, 16 to 256 wide) and a query group
    with tensor-core dots; other models take the unfused step."""
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        return f"head_dim={head_dim} is not a power of two from 16 to 256"
    if config.num_attention_heads % config.num_key_value_heads:
        return (f"num_attention_heads={config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={config.num_key_value_heads}")
    return None


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
