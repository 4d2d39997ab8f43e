"""The README's path on a GPU machine: the unchanged tinker SDK against a live stack whose
worker runs on CUDA in its default dtype (bf16), on the default model and on a random
Qwen3-0.6B-shaped one. It trains, samples greedy, at temperature 1, with top-p and top-k
(which crashed or hung before), and every logprob it gets back is compared with the same
weights in float64: within twice the error of the transformers forward in bf16."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.e2e.stack import API_KEY, Stack
from tests.gpu.test_numerics import token_logprobs
from workers import checkpoints
from workers.default_model import ensure_default_model
from workers.lora import BASE_SLOT
from workers.model import LoraModel

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]
CUDA = torch.device("cuda")
PROMPT = [9707, 11, 1879, 13, 358, 1079, 264]
COMPLETION = [1096, 374, 264, 1273, 13]


@pytest.mark.parametrize("size", ["default", "0.6b"])
def test_train_and_sample_through_the_sdk_match_float64(size, tmp_path):
    settings = {}
    if size != "default":
        settings["base_model"] = str(ensure_default_model(tmp_path / "qwen3", size))
    stack = Stack.start(tmp_path / "stack", "sqlite", **settings)
    try:
        base = settings.get("base_model", "tinkerq/tiny-qwen3")
        service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
        tc = service.create_lora_training_client(base, rank=8, seed=1).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(PROMPT + COMPLETION[:-1]),
            loss_fn_inputs={"target_tokens": np.array(PROMPT[1:] + COMPLETION),
                            "weights": np.array([0.0] * 6 + [1.0] * 5, dtype=np.float32)})
        losses = []
        for _ in range(4):
            fb = tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(fb.result().metrics["loss:sum"])
        assert losses[-1] < losses[0], losses
        trained = np.asarray(tc.forward([datum], "cross_entropy").result()
                             .loss_fn_outputs[0]["logprobs"].tolist())
        sampler = tc.save_weights_and_get_sampling_client("gpu").result()
        got = {}
        for label, params in {
            "greedy": types.SamplingParams(max_tokens=10, temperature=0.0),
            "t1": types.SamplingParams(max_tokens=10, temperature=1.0, seed=3),
            "top_p": types.SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, seed=4),
            "top_k": types.SamplingParams(max_tokens=10, temperature=1.0, top_k=5, seed=5),
        }.items():
            res = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params,
                                 include_prompt_logprobs=True).result(timeout=300)
            got[label] = res
        base_res = service.create_sampling_client(base_model=base).sample(
            types.ModelInput.from_ints(PROMPT), 2,
            types.SamplingParams(max_tokens=10, temperature=1.0, seed=6)).result(timeout=300)
    finally:
        stack.stop()

    folder = next(stack.data_dir.glob("checkpoints/**/adapter_config.json")).parent
    model_dir = settings.get("base_model") or stack.data_dir / "models" / "tiny-qwen3"
    own = LoraModel.load(model_dir, CUDA, torch.bfloat16)  # the worker's weights
    ref = LoraModel.load(model_dir, CUDA, torch.float64)
    ref.hf.load_state_dict(own.hf.state_dict())  # the same (bf16-rounded) values
    spec, weights = checkpoints.load_sampler_weights(folder)
    for m in (own, ref):
        m.set_adapter_weights(0, spec, weights)

    def errors(seq, returned, slot, start):
        want = token_logprobs(ref, [seq], slot)[0][start:]
        mine = token_logprobs(own, [seq], slot)[0][start:]
        return np.abs(np.asarray(returned) - want).max(), np.abs(mine - want).max()

    rows = [errors(PROMPT + COMPLETION, trained, 0, 0)]
    for res in got.values():
        rows += [errors(PROMPT + s.tokens, s.logprobs, 0, len(PROMPT) - 1)
                 for s in res.sequences]
        rows.append(errors(PROMPT, res.prompt_logprobs[1:], 0, 0))
    rows += [errors(PROMPT + s.tokens, s.logprobs, BASE_SLOT, len(PROMPT) - 1)
             for s in base_res.sequences]
    err, hf_err = max(r[0] for r in rows), max(r[1] for r in rows)
    print(f"\nSDK on CUDA bf16, {size}: {len(rows)} checks, returned logprobs max |err| vs "
          f"float64 {err:.2e}; transformers bf16 forward {hf_err:.2e}; losses {losses}")
    assert err <= 2 * hf_err, (err, hf_err)
    assert all(len(s.tokens) == 10 for res in got.values() for s in res.sequences)
