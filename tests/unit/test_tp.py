"""Tensor parallelism over 2 gloo ranks on CPU against the same model on one rank.

Each rank builds the tiny model twice from one seed, shards one copy (`apply_tp`) and
checks, against the whole copy, on a batch that mixes three adapters and the base model:
forward logprobs, losses, every LoRA gradient (a shard against the matching slice), the
gradient norm, the weights and logprobs after one AdamW step, and greedy sampling.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_qwen3_config
from tests.e2e.stack import free_port
from workers.lora import BASE_SLOT
from workers.model import AdapterSpec, LoraModel
from workers.parallel import tp
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import KV_DTYPES
from workers.sampling.sampler import SampleSpec, adapter_of
from workers.training.optimizer import adamw_step

SPECS = {0: AdapterSpec(4, 8.0), 1: AdapterSpec(8, 16.0, train_mlp=False),
         2: AdapterSpec(4, 4.0, train_unembed=False)}
ROWS = [([5, 9, 13, 21, 34, 55], 0), ([7, 7, 8, 100, 200], 1), ([300, 2, 3, 4], 2),
        ([11, 12, 13, 14, 15, 16, 17], 0), ([42, 43, 44], BASE_SLOT)]
ADAM = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01,
            grad_clip_norm=0.5)


def build(rank: int, size: int) -> tuple[LoraModel, LoraModel]:
    models = []
    for sharded in (False, True):
        m = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32,
                                  seed=0)
        if sharded:
            tp.apply_tp(m, tp.TP(rank, size, dist.group.WORLD))
        for slot, spec in SPECS.items():
            m.add_adapter(slot, spec, torch.Generator().manual_seed(slot))
        models.append(m)
    whole, part = models
    for slot in SPECS:  # non-zero B, so every factor matters
        g = torch.Generator().manual_seed(100 + slot)
        with torch.no_grad():
            for w in whole.adapter_weights(slot).values():
                w.B.copy_(torch.randn(w.B.shape, generator=g) * 0.3)
        part.set_adapter_weights(slot, SPECS[slot], whole.full_adapter(slot))
    return whole, part


def packed(m: LoraModel):
    tokens = [r[:-1] for r, _ in ROWS]
    targets = [r[1:] for r, _ in ROWS]
    weights = [torch.linspace(0.5, 1.5, len(t)) for t in tokens]
    return m.packed_pass(tokens, targets, [s for _, s in ROWS], [True] * len(ROWS),
                         lambda i, off, lp: -lp * weights[i][off : off + len(lp)])


def slice_of(layer, factor: str, full: torch.Tensor) -> torch.Tensor:
    return tp.shard_factor(layer, factor, full)


def greedy(m: LoraModel, fused: bool = False, kv_dtype=None) -> list[list[int]]:
    batch = RunningBatch(m, lambda ids: "", [], cuda_graphs=False, kv_tokens=2048,
                         fused=fused, kv_dtype=kv_dtype)
    for i, (row, slot) in enumerate(ROWS):
        batch.admit(i, SampleSpec(row, 1, 6, slot, temperature=0.0, stop_at_eos=False),
                    adapter_of(m, slot))
    done = {}
    while batch.busy:
        done.update(batch.step(4))
    return [done[i].sequences[0].tokens for i in range(len(ROWS))]


def check_rank(rank: int, size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        whole, part = build(rank, size)
        close = dict(atol=2e-5, rtol=1e-4)
        # top-k targets ([C, K]) over a vocabulary split between the ranks
        logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
        ids = torch.randint(0, 64, (5, 3), generator=torch.Generator().manual_seed(4))
        lo, n = rank * 64 // size, 64 // size
        got = tp.vocab_logprobs(logits[:, lo:lo + n], ids, lo, tp.TP(rank, size, dist.group.WORLD))
        torch.testing.assert_close(got, torch.log_softmax(logits, -1).gather(-1, ids), **close)
        # fresh adapters: the same A numbers as one GPU draws (this rank's part)
        fresh_whole, fresh_part = (LoraModel.from_config(
            tiny_qwen3_config(), torch.device("cpu"), torch.float32, seed=0) for _ in "ab")
        tp.apply_tp(fresh_part, tp.TP(rank, size, dist.group.WORLD))
        for m in (fresh_whole, fresh_part):
            m.add_adapter(0, SPECS[0], torch.Generator().manual_seed(7))
        for name, w in fresh_part.adapter_weights(0).items():
            layer, ref = fresh_part.layers[name], fresh_whole.adapter_weights(0)[name]
            torch.testing.assert_close(w.A, slice_of(layer, "A", ref.A), atol=0, rtol=0)

        a = packed(whole)
        backward, calls = tp._CopyTo.backward, []

        def counted(ctx, grad):
            calls.append(grad.shape)
            return backward(ctx, grad)

        tp._CopyTo.backward = staticmethod(counted)
        try:
            b = packed(part)
        finally:
            tp._CopyTo.backward = staticmethod(backward)
        # one all-reduce per decoder layer's col input: q/k/v share one, gate/up another
        # (the LM head's chunked loss sums its input gradient itself)
        assert len(calls) == 2 * len(part.hf.model.layers), calls
        for x, y in zip(a.logprobs + a.losses, b.logprobs + b.losses, strict=True):
            torch.testing.assert_close(y, x, **close)
        for slot in SPECS:
            layers = part.adapter_layers(slot)
            for i, (ga, gb) in enumerate(zip(a.grads[slot], b.grads[slot], strict=True)):
                torch.testing.assert_close(gb, slice_of(layers[i], "AB"[i % 2], ga), **close)
        # one AdamW step per adapter, clipped by the global norm
        for slot in SPECS:
            for m, res in ((whole, a), (part, b)):
                params = m.adapter_parameters(slot)
                for p, g in zip(params, res.grads[slot], strict=True):
                    p.grad = g
                norm = functools.partial(tp.grad_norm, m.adapter_layers(slot)) if m is part \
                    else None
                _, metrics = adamw_step(params, None, **ADAM, norm=norm)
                if m is whole:
                    want = metrics["grad_norm:mean"]
                else:
                    assert abs(metrics["grad_norm:mean"] - want) <= 1e-4 * want
        stepped = dict(atol=2e-4, rtol=0)  # Adam's first step is ±lr where |grad| >> eps;
        for slot in SPECS:  # a grad near eps moves its weight by a rounding-sensitive amount
            full = part.full_adapter(slot)
            for name, w in whole.adapter_weights(slot).items():
                torch.testing.assert_close(full[name][0], w.A.detach(), **stepped)
                torch.testing.assert_close(full[name][1], w.B.detach(), **stepped)
        a, b = packed(whole), packed(part)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            torch.testing.assert_close(y, x, **close)
        assert greedy(part) == greedy(whole)
        assert greedy(part, fused=True) == greedy(whole)  # (Triton's interpreter, conftest)
        fp8 = KV_DTYPES["fp8"]  # each rank's float8 cache holds its own heads' keys
        assert greedy(part, kv_dtype=fp8) == greedy(whole, kv_dtype=fp8)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [2])
def test_two_gloo_ranks_match_one(size):
    mp.spawn(check_rank, args=(size, free_port()), nprocs=size, join=True)


def check_sharded_load(rank: int, size: int, port: int, folder: str) -> None:
    """Each rank loads its part from the folder (meta build, safetensors slices) and holds
    exactly what cutting the whole model in memory gives, buffers included."""
    import transformers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        group = tp.TP(rank, size, dist.group.WORLD)
        cut = LoraModel.load(folder, torch.device("cpu"), torch.float32)  # whole, then cut
        tp.apply_tp(cut, group)
        whole_load = transformers.AutoModelForCausalLM.from_pretrained

        def refuse(*args, **kwargs):
            raise AssertionError("a tensor-parallel rank loaded the whole model")

        transformers.AutoModelForCausalLM.from_pretrained = refuse
        try:
            part = LoraModel.load(folder, torch.device("cpu"), torch.float32, group)
        finally:
            transformers.AutoModelForCausalLM.from_pretrained = whole_load
        want = dict(cut.hf.named_parameters()) | dict(cut.hf.named_buffers())
        got = dict(part.hf.named_parameters()) | dict(part.hf.named_buffers())
        assert got.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
        assert part.hf.lm_head.weight.shape[0] == 512 // size  # the head is cut too
        for slot, spec in SPECS.items():
            for m in (cut, part):
                m.add_adapter(slot, spec, torch.Generator().manual_seed(slot))
        for x, y in zip(packed(cut).logprobs, packed(part).logprobs, strict=True):
            torch.testing.assert_close(y, x, atol=0, rtol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_load_reads_each_ranks_part(tmp_path, tied):
    """Untied: the LM head has its own tensor to cut; the files are split in several
    safetensors shards with an index, as large checkpoints are."""
    config = tiny_qwen3_config()
    config.tie_word_embeddings = tied
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    mp.spawn(check_sharded_load, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
