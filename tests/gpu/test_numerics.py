"""Every number the GPU worker returns against float64, on the default model (head_dim 16,
the 151,936-token vocabulary) and a Qwen3-0.6B-shaped one, in fp32 and bf16: sampled,
greedy and prompt logprobs, top-k / top-p sampling (which did not compile on CUDA), and a
trained adapter's forward. The reference is the same weights in float64 (bf16 weights are
rounded once, in both). fp32: within 1e-4. bf16: no worse than twice what the transformers
forward in bf16 gives on the same tokens (the stated bound), printed beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)
from transformers import Qwen3Config

from config import load_settings
from tests.unit.test_executor import create, fwdbwd_body, job
from workers.default_model import DEFAULT_MODEL_CONFIG, QWEN3_HEAD_DIM, QWEN3_SHAPES
from workers.executor import Executor
from workers.lora import BASE_SLOT
from workers.model import LoraModel
from workers.sampling import choose
from workers.scheduler import Plan
from workers.training import fastpath

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ADAM = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
        "weight_decay": 0.0, "grad_clip_norm": 1.0}
PARAMS = {"greedy": (0.0, -1, 1.0), "t1": (1.0, -1, 1.0), "top_p": (0.7, -1, 0.9),
          "top_k": (1.0, 5, 1.0)}
PROMPT = [9707, 11, 1879, 13, 358, 1079, 264]


def config_of(name: str) -> Qwen3Config:
    if name == "default":
        return Qwen3Config(**{k: v for k, v in DEFAULT_MODEL_CONFIG.items()
                              if k not in ("dtype", "torch_dtype")})
    hidden, inter, layers, heads, kv = QWEN3_SHAPES[name]
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=QWEN3_HEAD_DIM,
                       max_position_embeddings=40960, tie_word_embeddings=True,
                       eos_token_id=151645, architectures=["Qwen3ForCausalLM"])


def token_logprobs(model: LoraModel, seqs: list[list[int]], slot: int) -> list[np.ndarray]:
    """log p(seq[t] | seq[:t]) for t >= 1, by the model's plain (training) forward."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq], device=CUDA)
            logits, _ = model.forward_logits(ids, torch.ones_like(ids), [slot])
            lp = torch.log_softmax(logits[0].double(), dim=-1)
            out.append(lp[:-1].gather(1, ids[0, 1:, None])[:, 0].cpu().numpy())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["default", "0.6b"])
def test_every_returned_logprob_matches_float64(name, dtype, tmp_path):
    config = config_of(name)
    model = LoraModel.from_config(config, CUDA, dtype, seed=0)
    fastpath.compile_kernels()
    choose.compile_sampling()
    settings = load_settings(env={}, data_dir=str(tmp_path), max_lora_adapters=2,
                             max_models=4, sample_kv_tokens=0)
    ex = Executor(model, settings, decode=lambda ids: "", eos_token_ids=[config.eos_token_id])
    assert create(ex, "a", rank=8, seed=1)["create_model-a-None"].ok
    tokens = PROMPT + [1096, 374, 264, 1273, 13]
    assert ex.run(Plan(train=[job("forward_backward", fwdbwd_body("a", 1, tokens), "a", 1)]))
    assert ex.run(Plan(barriers=[job("optim_step", {"adam_params": ADAM}, "a", 2)])
                  )["optim_step-a-2"].ok
    folder = tmp_path / "sampler"
    assert ex.run(Plan(barriers=[job("save_weights_for_sampler", {
        "checkpoint_dir": str(folder), "tinker_path": None, "sampling_session_id": "s"},
        "a", 3)]))["save_weights_for_sampler-a-3"].ok
    forward = ex.run(Plan(train=[job("forward", fwdbwd_body("a", 4, tokens, forward_only=True),
                                     "a", 4)]))["forward-a-4"]
    trained = np.asarray(deserialize_forward_backward_output(forward.proto)
                         .loss_fn_outputs[0]["logprobs"].data)

    jobs = []
    for adapter in (None, str(folder)):
        for i, (label, (temp, top_k, top_p)) in enumerate(PARAMS.items()):
            jobs.append(job("sample", {
                "prompt": PROMPT, "num_samples": 3, "max_tokens": 12, "temperature": temp,
                "top_k": top_k, "top_p": top_p, "seed": 10 + i, "stop_strings": [],
                "stop_token_ids": [], "stop_at_eos": False, "prompt_logprobs": True,
                "topk_prompt_logprobs": 0, "adapter_dir": adapter},
                rid=f"{label}-{'lora' if adapter else 'base'}"))
    outcomes = ex.run(Plan(samples=jobs))
    while ex.busy:
        outcomes.update(ex.run(Plan()))
    assert all(outcomes[j.request_id].ok for j in jobs), {
        k: o.error for k, o in outcomes.items() if not o.ok}

    # the references: the same weights (and the saved adapter) in float64, and in this dtype
    ref = LoraModel.from_config(config, CUDA, torch.float64, seed=0)
    ref.hf.load_state_dict(model.hf.state_dict())
    from workers import checkpoints

    spec, weights = checkpoints.load_sampler_weights(folder)
    for m in (ref, model):
        m.set_adapter_weights(3, spec, weights)
    seqs, got, slots = [], [], []
    for j in jobs:
        out = deserialize_sample_response(outcomes[j.request_id].proto)
        slot = 3 if j.body["adapter_dir"] else BASE_SLOT
        for s in out.sequences:
            seqs.append(PROMPT + s.tokens)
            got.append(np.asarray(s.logprobs))
            slots.append(slot)
        lp = np.asarray([x for x in out.prompt_logprobs[1:]])
        want = token_logprobs(ref, [PROMPT], slot)[0]
        np.testing.assert_allclose(lp, want, atol=1e-4 if dtype == torch.float32 else 5e-2)
        if j.body["top_k"] == 5:  # every sampled token is among the 5 likeliest
            for s in out.sequences:
                ranks = [rank_of(model, PROMPT + s.tokens[:t], tok, slot)
                         for t, tok in enumerate(s.tokens)]
                assert max(ranks) < (5 if dtype == torch.float32 else 6), ranks  # bf16 ties
    n = len(PROMPT)
    want = [token_logprobs(ref, [seq], slot)[0][n - 1:] for seq, slot in zip(seqs, slots,
                                                                              strict=True)]
    err = max(np.abs(g - w).max() for g, w in zip(got, want, strict=True))
    trained_err = np.abs(trained - token_logprobs(ref, [tokens], 3)[0]).max()
    own = [token_logprobs(model, [seq], slot)[0][n - 1:] for seq, slot in zip(seqs, slots,
                                                                              strict=True)]
    hf_err = max(np.abs(o - w).max() for o, w in zip(own, want, strict=True))
    print(f"\n{name} {dtype}: sampled/greedy logprobs max |err| {err:.2e}, forward "
          f"{trained_err:.2e}, transformers forward in this dtype {hf_err:.2e}")
    if dtype == torch.float32:
        assert err <= 1e-4 and trained_err <= 1e-4 and hf_err <= 1e-4
    else:
        assert err <= 2 * hf_err and trained_err <= 2 * hf_err


def rank_of(model: LoraModel, seq: list[int], token: int, slot: int) -> int:
    with torch.no_grad():
        ids = torch.tensor([seq], device=CUDA)
        logits, _ = model.forward_logits(ids, torch.ones_like(ids), [slot])
    last = logits[0, -1].double()
    return int((last > last[token]).sum())
