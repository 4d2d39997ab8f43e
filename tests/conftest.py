"""Shared fixtures: a tiny random-weight Qwen3 built from a config (no downloads)."""

from __future__ import annotations

import os

import pytest

# Triton's interpreter runs the fused decode step's kernels on CPU tensors; it must be on
# before anything imports them (Triton reads it when the kernels are defined). Only tests
# that ask for the fused step use it: the default stays the eager step off CUDA.
os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_qwen3_config(vocab_size: int = 512, layers: int = 2):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        architectures=["Qwen3ForCausalLM"],
    )


@pytest.fixture
def tiny_model():
    """A fresh fp32 2-layer Qwen3 (vocab 512) wrapped for multi-LoRA, on the CPU."""
    import torch

    from workers.model import LoraModel

    return LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32, seed=0)
