"""The losses that need more than one log-prob per token, on the GPU's training path (the
fast layers, the compiled target gather): top-k cross_entropy beside plain rows, gspo's
whole-row ratio and a create_custom_loss graph give the CPU's losses, log-probs and
gradients, in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.wire import FwdBwdRequest, WireDatum
from tests.conftest import tiny_qwen3_config
from tests.unit.test_trainer import SPECS, job, topk_job
from workers.model import LoraModel
from workers.training.trainer import Trainer, TrainJob

pytestmark = pytest.mark.gpu


def gspo_job(slot: int, seq: list[int], seed: int) -> TrainJob:
    rng = np.random.default_rng(seed)
    n = len(seq) - 1
    data = [WireDatum(np.array(seq[:-1]), {
        "target_tokens": np.array(seq[1:]),
        "logprobs": rng.uniform(-7, -5, n).astype(np.float32),
        "advantages": rng.normal(size=n).astype(np.float32),
        "sequence_ratio_mask": (np.arange(n) >= 2).astype(np.float32)})]
    request = FwdBwdRequest("m", 1, "gspo", {}, False, data)
    return TrainJob(request, {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}, slot)


def custom_job(slot: int, seq: list[int], seed: int) -> TrainJob:
    """PPO's objective as a custom graph (tests/unit/test_custom_loss.py), its metric too."""
    from protocol.custom_graph import check_custom_loss
    from tests.unit.test_custom_loss import CASES, upload

    rng = np.random.default_rng(seed)
    n = len(seq) - 1
    old = rng.uniform(-7, -5, n).astype(np.float32)
    data = [WireDatum(np.array(seq[:-1]), {
        "target_tokens": np.array(seq[1:]), "old": old,
        "advantages": rng.normal(size=n).astype(np.float32)})]
    request = FwdBwdRequest("m", 1, "custom", {}, False, data)
    return TrainJob(request, {"custom_loss": check_custom_loss(upload(*CASES["clipped"]))}, slot)


def run_on(device: str):
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device(device), torch.float32)
    for slot in (0, 1, 2, 3):
        model.add_adapter(slot, SPECS[slot], torch.Generator().manual_seed(slot))
        for w in model.adapter_weights(slot).values():
            with torch.no_grad():
                w.B.copy_(torch.randn(w.B.shape, generator=torch.Generator().manual_seed(7)))
                w.B.mul_(0.05)
    jobs = [topk_job(0, [1, 2, 3, 4, 5, 6, 7, 8], 4, seed=1), job(1, [[10, 11, 12, 13]]),
            gspo_job(3, [9, 8, 7, 6, 5, 4], seed=2), custom_job(2, [4, 6, 8, 10, 12], seed=3)]
    out = Trainer(model, chunk_tokens=4).run(jobs)
    assert all(r.error is None for r in out), [r.error for r in out]
    grads = {s: [p.grad.float().cpu() for p in model.adapter_parameters(s)]
             for s in (0, 1, 2, 3)}
    return out, grads


def test_top_k_and_gspo_on_the_gpu_match_the_cpu():
    gpu, gpu_grads = run_on("cuda")
    cpu, cpu_grads = run_on("cpu")
    for a, b in zip(gpu, cpu, strict=True):
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-4, abs=1e-4)
        assert a.outputs[0]["logprobs"].shape == b.outputs[0]["logprobs"].shape
        np.testing.assert_allclose(a.outputs[0]["logprobs"], b.outputs[0]["logprobs"],
                                   rtol=1e-4, atol=1e-4)
    assert gpu[3].metrics["custom/ratio:mean"] == pytest.approx(
        cpu[3].metrics["custom/ratio:mean"], rel=1e-4)
    for s in (0, 1, 2, 3):
        for g, c in zip(gpu_grads[s], cpu_grads[s], strict=True):
            torch.testing.assert_close(g, c, rtol=1e-3, atol=1e-5)
    print(f"\ntop-k/gspo/custom on cuda vs cpu: losses {[round(r.loss_sum, 4) for r in gpu]}")
