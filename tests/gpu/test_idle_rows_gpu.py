"""The running batch on the GPU's own path (CUDA graphs, fused step) with a row that ends
beside longer-running rows when prompt + max_tokens is whole blocks: the case that hit a
device-side assert in the H100 RL run (tests/unit/test_decoding.py has the CPU twin). Each
call gives what it gives alone, and the device stays usable."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_qwen3_config
from tests.unit.test_decoding import spec
from tests.unit.test_sampler import decode
from workers.model import LoraModel
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import BLOCK

pytestmark = pytest.mark.gpu


def _run(model, arrivals):
    batch = RunningBatch(model, decode, [511], cuda_graphs=True, kv_tokens=8192)
    results, tick = {}, 0
    while len(results) < len(arrivals):
        for key, (at, s) in arrivals.items():
            if at == tick:
                batch.admit(key, s, None)
        results.update(batch.step(8))
        tick += 1
    torch.cuda.synchronize()
    return results


def test_a_row_ending_at_a_whole_block_beside_running_rows_on_graphs():
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cuda"), torch.float32,
                                  seed=0)
    shape = {"temperature": 0.0}  # greedy: a batch's fp32 rounding flips no draw
    arrivals = {"first": (0, spec(list(range(1, 17)), 2 * BLOCK - 16, seed=1, **shape)),
                "later": (2, spec(list(range(2, 18)), 2 * BLOCK - 16, seed=2, num_samples=3,
                                  **shape))}
    together = _run(model, arrivals)
    for key, (_, s) in arrivals.items():
        alone = _run(model, {key: (0, s)})[key]
        for got, want in zip(together[key].sequences, alone.sequences, strict=True):
            assert len(got.tokens) == s.max_tokens and got.tokens == want.tokens, key
    assert torch.ones(1, device="cuda").add(1).item() == 2  # no assert left the device lost
