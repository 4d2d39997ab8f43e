"""Rows that share a prompt, on the GPU's training path: the shared keys go through flash
attention's variable-length kernel with more keys than queries per row (causal from the
bottom right). In bf16 the shared pass must be as close to an fp32 reference as the
unshared bf16 pass is: a key seen or missed by a wrong mask would be far off."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_qwen3_config
from tests.unit.test_trainer import SPECS, _group_rows, _weighted
from workers.model import LoraModel

pytestmark = pytest.mark.gpu


def _pass(dtype: torch.dtype, share: bool):
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cuda"), dtype, seed=0)
    for slot in (0, 1):
        model.add_adapter(slot, SPECS[slot], torch.Generator().manual_seed(slot))
        for w in model.adapter_weights(slot).values():
            with torch.no_grad():
                w.B.copy_(torch.randn(w.B.shape, generator=torch.Generator().manual_seed(7)))
                w.B.mul_(0.05)
    model.share_prefixes = share
    tokens, targets, slots = _group_rows()
    return model.packed_pass(tokens, targets, slots, [True] * len(slots), _weighted,
                             chunk_tokens=7)


def _errors(got, want) -> tuple[float, float]:
    lp = max((a - b).abs().max().item() for a, b in zip(got.logprobs, want.logprobs,
                                                        strict=True))
    grad = max(((a - b).norm() / b.norm()).item() for s in (0, 1)
               for a, b in zip(got.grads[s], want.grads[s], strict=True))
    return lp, grad


def test_shared_prompts_in_bf16_are_as_close_to_fp32_as_the_plain_pass():
    reference = _pass(torch.float32, share=False)  # per-row SDPA, no sharing
    plain = _errors(_pass(torch.bfloat16, share=False), reference)
    shared = _errors(_pass(torch.bfloat16, share=True), reference)
    print(f"bf16 vs fp32, max |d logprob| / grad rel. error: plain {plain}, shared {shared}")
    assert shared[0] <= 2 * plain[0] + 1e-3
    assert shared[1] <= 2 * plain[1] + 1e-3
