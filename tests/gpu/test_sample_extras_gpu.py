"""The sampler's extras on the GPU's own path (fused decode, CUDA graphs, a saved adapter's
sampler slot) against the same weights in float64: topk_sample_logprobs, target ids scored
at prompt positions, prompt_logprobs_last_n, and prompt_alt_tokens_k's draws (seeded,
raw-model log-probs). fp32 on the default model: within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker.proto.response_conv import deserialize_sample_response

from config import load_settings
from tests.gpu.test_numerics import CUDA, PROMPT, config_of
from tests.unit.test_executor import create, job
from workers import checkpoints
from workers.executor import Executor
from workers.model import LoraModel
from workers.scheduler import Plan

pytestmark = pytest.mark.gpu


def test_sample_extras_match_float64(tmp_path):
    config = config_of("default")
    model = LoraModel.from_config(config, CUDA, torch.float32, seed=0)
    ex = Executor(model, load_settings(env={}, data_dir=str(tmp_path), max_lora_adapters=2,
                                       max_models=4), decode=lambda ids: "",
                  eos_token_ids=[config.eos_token_id])
    assert create(ex, "a", rank=8, seed=2)["create_model-a-None"].ok
    folder = tmp_path / "sampler"
    ex.run(Plan(barriers=[job("save_weights_for_sampler", {
        "checkpoint_dir": str(folder), "tinker_path": None, "sampling_session_id": "s"},
        "a", 1)]))
    rows = len(PROMPT) - 1
    ids = [[-1, -1] for _ in range(rows)]
    ids[2], ids[rows - 1] = [151645, -1], [42, 7]
    body = {"prompt": PROMPT, "num_samples": 2, "max_tokens": 6, "temperature": 0.8,
            "top_k": -1, "top_p": 1.0, "seed": 4, "stop_strings": [], "stop_token_ids": [],
            "stop_at_eos": False, "prompt_logprobs": True, "topk_prompt_logprobs": 0,
            "topk_sample_logprobs": 3, "prompt_logprobs_last_n": 3, "prompt_alt_tokens_k": 2,
            "target_prompt": {"ids": ids, "layout": None}, "adapter_dir": str(folder)}
    outcomes = ex.run(Plan(samples=[job("sample", body, rid="x")]))
    while ex.busy:
        outcomes.update(ex.run(Plan()))
    assert outcomes["x"].ok, outcomes["x"].error
    out = deserialize_sample_response(outcomes["x"].proto)

    ref = LoraModel.from_config(config, CUDA, torch.float64, seed=0)
    ref.hf.load_state_dict(model.hf.state_dict())
    spec, weights = checkpoints.load_sampler_weights(folder)
    ref.set_adapter_weights(3, spec, weights)

    def logp(seq: list[int]) -> torch.Tensor:
        ids_t = torch.tensor([seq], device=CUDA)
        with torch.no_grad():
            logits, _ = ref.forward_logits(ids_t, torch.ones_like(ids_t), [3])
        return torch.log_softmax(logits[0], -1)

    prompt_lp = logp(PROMPT)[:-1]  # [rows, V]
    want = prompt_lp.gather(-1, torch.tensor(PROMPT[1:], device=CUDA)[:, None])[:, 0]
    assert all(x is None for x in out.prompt_logprobs[:-3])  # NaN on the wire: unscored
    np.testing.assert_allclose(np.array(out.prompt_logprobs[-3:]), want[-3:].cpu().numpy(),
                               atol=1e-4)
    target = out.target_prompt_logprobs.to_numpy()
    assert target.shape == (rows, 2) and target[0].tolist() == [0.0, 0.0]
    for (i, j), token in {(2, 0): 151645, (rows - 1, 0): 42, (rows - 1, 1): 7}.items():
        assert target[i, j] == pytest.approx(prompt_lp[i, token].item(), abs=1e-4)
    alt_tokens = torch.tensor(out.prompt_alt_tokens.tokens.to_numpy(), device=CUDA)
    alt_lp = out.prompt_alt_tokens.logprobs.to_numpy()
    assert alt_tokens.shape == (rows, 2)
    np.testing.assert_allclose(alt_lp, prompt_lp.gather(-1, alt_tokens).cpu().numpy(),
                               atol=1e-4)
    for seq in out.sequences:
        full = logp(PROMPT + seq.tokens)[len(PROMPT) - 1:-1]  # [n, V]
        top, top_ids = full.topk(3, -1)
        assert (seq.topk_logprobs_np.token_ids == top_ids.cpu().numpy()).all()
        np.testing.assert_allclose(seq.topk_logprobs_np.logprobs, top.cpu().numpy(), atol=1e-4)
