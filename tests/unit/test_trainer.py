"""The packed, micro-batched training pass: same numbers as the plain padded pass, adapters
isolated in mixed batches, bounded loss memory, out-of-memory split-and-retry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.wire import FwdBwdRequest, WireDatum
from tests.conftest import tiny_qwen3_config
from workers.lora import BASE_SLOT
from workers.model import AdapterSpec, LoraModel
from workers.training import packed
from workers.training.optimizer import adamw_step
from workers.training.trainer import Trainer, TrainJob, _Row, micro_batches

SPECS = {  # different ranks, alphas and target sets
    0: AdapterSpec(rank=4, alpha=8),
    1: AdapterSpec(rank=8, alpha=32, train_mlp=False),
    2: AdapterSpec(rank=2, alpha=2, train_attn=False, train_unembed=False),
    3: AdapterSpec(rank=16, alpha=16, train_unembed=False),
}
ADAM = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01,
        "grad_clip_norm": 0.0}


def model_with(slots) -> LoraModel:
    model = LoraModel.from_config(tiny_qwen3_config(), torch.device("cpu"), torch.float32)
    for slot in slots:
        model.add_adapter(slot, SPECS[slot], torch.Generator().manual_seed(slot))
        for w in model.adapter_weights(slot).values():  # non-zero B, so adapters matter
            with torch.no_grad():
                w.B.copy_(torch.randn(w.B.shape, generator=torch.Generator().manual_seed(7)))
                w.B.mul_(0.05)
    return model


def job(slot: int, seqs: list[list[int]], forward_only=False) -> TrainJob:
    data = [WireDatum(np.array(s[:-1]), {"target_tokens": np.array(s[1:]),
                                         "weights": np.linspace(-1, 2, len(s) - 1)})
            for s in seqs]
    request = FwdBwdRequest("m", 1, "cross_entropy", {}, forward_only, data)
    return TrainJob(request, {}, slot)


def grads(model: LoraModel, slot: int) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.adapter_parameters(slot)]


SEQS = {0: [[1, 2, 3, 4, 5, 6], [7, 8, 9]], 1: [[10, 11, 12, 13]], 2: [[5, 4, 3, 2, 1, 0, 9]],
        3: [[20, 21, 22], [23, 24, 25, 26, 27]]}


def _mixed_rows():
    rows = [(s, seq) for s in (1, BASE_SLOT, 0, 3, 2) for seq in SEQS.get(s, [[30, 31, 32]])]
    return [seq[:-1] for _, seq in rows], [seq[1:] for _, seq in rows], [s for s, _ in rows]


def _sum_of_logprobs(row, offset, lp):  # loss = -Σ log p, so gradients are those of Σ log p
    return -lp


@pytest.mark.parametrize("fast", [True, False], ids=["fastpath", "transformers-layers"])
def test_packed_pass_matches_the_padded_pass_with_mixed_adapters(fast):
    model = model_with([0, 1, 2, 3])
    model.fast = fast
    tokens, targets, slots = _mixed_rows()
    padded = model.target_logprobs(tokens, targets, slots)
    sum(x.sum() for x in padded).backward()
    expected = {s: grads(model, s) for s in SPECS}
    got = model.packed_pass(tokens, targets, slots, [True] * len(slots), _sum_of_logprobs,
                            chunk_tokens=5, checkpoint_layers=True)
    for a, b, loss in zip(padded, got.logprobs, got.losses, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-5)
        torch.testing.assert_close(-b, loss)
    assert sorted(got.grads) == [0, 1, 2, 3]
    for s in SPECS:
        for a, b in zip(expected[s], got.grads[s], strict=True):
            torch.testing.assert_close(-a, b, rtol=1e-4, atol=1e-6)


def test_fastpath_layers_match_the_transformers_layers_under_torch_compile():
    """The compiled element-wise kernels (what CUDA workers run) give the eager numbers."""
    from workers.training import fastpath

    model = model_with([0, 1])
    tokens, targets, slots = _mixed_rows()
    tokens, targets, slots = zip(*[r for r in zip(tokens, targets, slots, strict=True)
                                   if r[2] in (0, 1, BASE_SLOT)], strict=True)
    model.fast = False
    want = model.packed_pass(tokens, targets, slots, [True] * len(slots), _sum_of_logprobs)
    saved = vars(fastpath.KERNELS).copy()
    try:
        fastpath.compile_kernels()
        model.fast = True
        got = model.packed_pass(tokens, targets, slots, [True] * len(slots), _sum_of_logprobs,
                                chunk_tokens=4)
    finally:
        vars(fastpath.KERNELS).update(saved)
    for a, b in zip(want.logprobs, got.logprobs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for s in (0, 1):
        for a, b in zip(want.grads[s], got.grads[s], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_adapter_trains_the_same_alone_or_beside_others_in_one_tick():
    alone, mixed = model_with([0]), model_with([0, 1, 2, 3])
    Trainer(alone).run([job(0, SEQS[0])])
    out = Trainer(mixed).run([job(1, SEQS[1]), job(0, SEQS[0]), job(2, SEQS[2]), job(3, SEQS[3])])
    assert all(r.error is None for r in out)
    for a, b in zip(grads(alone, 0), grads(mixed, 0), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for model in (alone, mixed):
        adamw_step(model.adapter_parameters(0), None, **ADAM)
    after = [Trainer(m).run([job(0, SEQS[0], forward_only=True)])[0].outputs for m in (alone,
                                                                                      mixed)]
    for a, b in zip(*after, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=0, atol=1e-5)


def test_micro_batches_give_the_same_result_and_hold_one_job_per_slot():
    jobs = [job(0, SEQS[0]), job(1, SEQS[1]), job(0, [[1, 2, 3]]), job(3, SEQS[3])]
    whole, cut = model_with([0, 1, 3]), model_with([0, 1, 3])
    a = Trainer(whole).run(jobs)
    b = Trainer(cut, micro_batch_tokens=6).run(jobs)
    for ra, rb in zip(a, b, strict=True):
        assert ra.loss_sum == pytest.approx(rb.loss_sum, abs=1e-4)
    for s in (0, 1, 3):
        for ga, gb in zip(grads(whole, s), grads(cut, s), strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    rows = [_Row(j, d, jb.slot, True) for j, jb in enumerate(jobs) for d in jb.request.data]
    for micro in micro_batches(rows, budget=100, num_jobs=len(jobs)):
        owners = {}
        for i in micro:
            assert owners.setdefault(rows[i].slot, rows[i].job) == rows[i].job


def test_loss_side_holds_at_most_one_chunk_of_logits(monkeypatch):
    seen = []
    real = packed.chunk_logprobs
    monkeypatch.setattr(packed, "chunk_logprobs",
                        lambda head, h, t, seg: seen.append(h.shape[0]) or real(head, h, t, seg))
    Trainer(model_with([0]), chunk_tokens=4).run([job(0, SEQS[0] + SEQS[3])])
    assert seen and max(seen) <= 4


def test_out_of_memory_splits_and_retries_and_a_too_large_datum_fails_alone(monkeypatch):
    limit = 8  # pretend the GPU holds 8 tokens per micro-batch
    real = Trainer._forward_backward

    def fake(self, micro, jobs, rows, staged, per_row):
        if sum(rows[i].tokens for i in micro) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, micro, jobs, rows, staged, per_row)

    jobs = [job(0, SEQS[0]), job(1, SEQS[1]), job(3, [[1] * 12]), job(2, SEQS[2])]
    reference = model_with([0, 1, 2, 3])
    expected = Trainer(reference).run([jobs[0], jobs[1], jobs[3]])
    monkeypatch.setattr(Trainer, "_forward_backward", fake)
    model = model_with([0, 1, 2, 3])
    trainer = Trainer(model)
    out = trainer.run(jobs)
    assert out[2].error and "11 tokens" in out[2].error and "alone" in out[2].error
    assert all(p.grad is None for p in model.adapter_parameters(3))  # nothing half-applied
    for got, want in zip([out[0], out[1], out[3]], expected, strict=True):
        assert got.error is None and got.loss_sum == pytest.approx(want.loss_sum, abs=1e-4)
    for s in (0, 1, 2):
        for a, b in zip(grads(reference, s), grads(model, s), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert trainer.learned_budget is not None and trainer.learned_budget <= 16


def test_warm_up_runs_a_pass_and_leaves_no_adapter_behind():
    model = model_with([0])
    before = {name: sorted(layer.adapters) for name, layer in model.layers.items()}
    model.warm_up(slot=99)
    assert 99 not in model.adapters
    assert {name: sorted(layer.adapters) for name, layer in model.layers.items()} == before
    assert all(p.grad is None for p in model.adapter_parameters(0))


def topk_job(slot: int, seq: list[int], k: int, seed: int) -> TrainJob:
    """Top-k distillation data: k candidate targets per position, each with a weight."""
    rng = np.random.default_rng(seed)
    n = len(seq) - 1
    targets = np.concatenate([np.array(seq[1:])[:, None], rng.integers(0, 64, (n, k - 1))], 1)
    data = [WireDatum(np.array(seq[:-1]), {"target_tokens": targets,
                                           "weights": rng.uniform(-0.5, 1, (n, k))})]
    return TrainJob(FwdBwdRequest("m", 1, "cross_entropy", {}, False, data), {}, slot)


def test_top_k_cross_entropy_beside_plain_rows_matches_log_softmax():
    """[N, K] targets and weights (K = 3, and a K = 2 row padded beside it) and a plain row in
    one pack, with 4-token loss chunks: the logprobs ([N, K] per top-k datum), the loss and
    the gradients are those of -sum w * log_softmax[targets] computed directly."""
    model = model_with([0, 1, 3])
    jobs = [topk_job(0, [1, 2, 3, 4, 5, 6], 3, seed=1), job(1, SEQS[1]),
            topk_job(3, [9, 8, 7, 6], 2, seed=2)]
    out = Trainer(model, chunk_tokens=4).run(jobs)
    assert all(r.error is None for r in out)
    got = {s: grads(model, s) for s in (0, 1, 3)}
    for s in (0, 1, 3):
        for p in model.adapter_parameters(s):
            p.grad = None
    for job_, result in zip(jobs, out, strict=True):
        datum = job_.request.data[0]
        mask = torch.ones(1, len(datum.tokens), dtype=torch.long)
        logits, _ = model.forward_logits(torch.tensor([datum.tokens.tolist()]), mask,
                                         [job_.slot])
        logp = torch.log_softmax(logits[0].float(), -1)
        y = torch.tensor(datum.inputs["target_tokens"])
        picked = logp.gather(-1, y.view(len(y), -1)).view(y.shape)
        loss = -(picked * torch.tensor(datum.inputs["weights"], dtype=torch.float32)).sum()
        loss.backward()
        assert result.outputs[0]["logprobs"].shape == tuple(y.shape)
        np.testing.assert_allclose(result.outputs[0]["logprobs"], picked.detach().numpy(),
                                   rtol=1e-5, atol=1e-5)
        assert result.loss_sum == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-4)
    for s in (0, 1, 3):
        for a, p in zip(got[s], model.adapter_parameters(s), strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def _group_rows():
    """An RL-like batch: 4 samples of one 20-token prompt on slot 0 (one repeats another's
    first completion token, so it shares 21 positions), the same prompt on slot 1 (shares
    only with slot 1's other row), and rows too short to share."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 90, (20,), generator=g).tolist()
    rows, slots = [], []
    for slot, n in ((0, 4), (1, 2)):
        for j in range(n):
            completion = torch.randint(1, 90, (5 + 3 * j,), generator=g).tolist()
            rows.append(prompt + completion)
            slots.append(slot)
    rows[2][20] = rows[0][20]  # sample 2 starts as sample 0 did
    rows += [[1, 2, 3, 4], prompt[:10] + [5]]
    slots += [0, 0]
    return [r[:-1] for r in rows], [r[1:] for r in rows], slots


def _weighted(row, offset, lp):  # a different weight at every position of every row
    w = torch.arange(offset, offset + len(lp), dtype=lp.dtype, device=lp.device) * 0.1 + row
    return -w * lp


def test_rows_sharing_a_prompt_run_it_once_with_the_same_numbers():
    model = model_with([0, 1])
    tokens, targets, slots = _group_rows()
    pack = packed.make_pack(tokens, targets, slots, torch.device("cpu"), share=True)
    # rows 1-3 share 19 positions with row 0 (row 2: 20), row 5 19 with row 4; none across slots
    assert pack.shared_tokens == 19 + 20 + 19 + 19
    assert pack.num_tokens == sum(map(len, tokens)) - pack.shared_tokens
    results = {}
    for share in (False, True):
        model.share_prefixes = share
        results[share] = model.packed_pass(tokens, targets, slots, [True] * len(slots),
                                           _weighted, chunk_tokens=7, checkpoint_layers=share)
    plain, shared = results[False], results[True]
    for a, b in zip(plain.logprobs + plain.losses, shared.logprobs + shared.losses,
                    strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for s in (0, 1):  # summed in another order (the shared keys' gradients): fp32 rounding
        for a, b in zip(plain.grads[s], shared.grads[s], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_a_prefix_is_shared_only_where_tokens_and_targets_agree():
    prompt = list(range(1, 31))
    tokens = [prompt + [40, 41], prompt + [50], prompt[:25] + [9] + prompt[26:]]
    targets = [t[1:] + [0] for t in tokens]
    targets[1][17] = 77  # row 1's targets part from row 0's at position 17
    pack = packed.make_pack(tokens, targets, [0, 0, 0], torch.device("cpu"), share=True)
    assert pack.views[1] == [(0, 17, 0), (32, 46, 17)]  # row 1 keeps positions 17..
    assert pack.views[2] == [(0, 24, 0), (46, 52, 24)]  # token 25 differs: so does target 24
    assert pack.positions[32].item() == 17 and pack.kv_index is not None
    assert packed.make_pack(tokens, targets, [0, 0, 0], torch.device("cpu")).kv_index is None
