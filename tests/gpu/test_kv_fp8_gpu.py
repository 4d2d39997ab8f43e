"""A float8 KV cache on the GPU's own path (CUDA graphs, the fused step: the K/V epilogue
rounds in the kernel, attention reads float8): a decoded token's logprob is the one a
prefill over the rounded keys and values gives it (tests/unit/test_kv_fp8.py has the CPU
twin, where torch rounds for the interpreter)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_qwen3_config
from tests.unit.test_decoding import spec
from tests.unit.test_kv_sharing import LONG
from tests.unit.test_sampler import decode
from workers.model import LoraModel
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import KV_DTYPES

pytestmark = pytest.mark.gpu
FP8 = KV_DTYPES["fp8"]


def _run(model, s, kv_dtype, graphs):
    batch = RunningBatch(model, decode, [511], cuda_graphs=graphs, kv_tokens=8192,
                         kv_dtype=kv_dtype)
    batch.admit("x", s, None)
    results = {}
    while batch.busy:
        results.update(batch.step(8))
    return results["x"]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_fp8_decode_steps_give_the_logprobs_a_prefill_gives(dtype, atol):
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cuda"), dtype, seed=0)
    out = _run(model, spec(LONG, 40, temperature=1.0, seed=5, num_samples=4), FP8, True)
    got, same, plain = [], [], []
    for seq in out.sequences:
        assert len(seq.tokens) == 40
        got.append(torch.tensor(seq.logprobs))
        for kv, into in ((FP8, same), (None, plain)):
            scored = _run(model, spec(LONG + seq.tokens, 1, prompt_logprobs=True), kv, False)
            into.append(torch.tensor(scored.prompt.logprobs[len(LONG):]))
    got, same, plain = torch.cat(got), torch.cat(same), torch.cat(plain)
    torch.testing.assert_close(got, same, atol=atol, rtol=0)
    assert (got - plain).abs().mean() > 1e-3  # the cache did round
