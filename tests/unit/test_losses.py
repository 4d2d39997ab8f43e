"""Tinker losses: values and gradients against float64 references, and through the model.

Run: python -m pytest tests/unit/test_losses.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protocol.jobs import UserError
from protocol.losses import resolve_loss_config
from workers.model import AdapterSpec
from workers.training.losses import ROW_STATS, token_losses

N = 64


def _ref_objective_and_grad(loss_fn: str, lp: float, x: dict[str, float], cfg: dict):
    """One token's objective and d(objective)/d(lp), by hand in Python floats (float64)."""
    if loss_fn == "cross_entropy":
        return lp * x["weights"], x["weights"]
    q, a = x["logprobs"], x["advantages"]
    r = math.exp(lp - q)
    if loss_fn == "importance_sampling":
        return r * a, r * a
    if loss_fn == "stable_reinforce":
        m, c, kl = x["sampled_mask"], cfg["clip_high_threshold"], cfg["kl_coeff"]
        objective = m * (min(r, c) * lp * a - kl * (r - 1 - (lp - q)))
        return objective, m * (min(r, c) * a - kl * (r - 1))
    if loss_fn == "dro":
        beta = cfg["beta"]
        return lp * a - 0.5 * beta * (lp - q) ** 2, a - beta * (lp - q)
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    rc = min(max(r, lo), hi)
    if loss_fn == "cispo":
        return rc * lp * a, rc * a
    # ppo: the smaller branch decides; a clipped branch is constant in lp.
    unclipped, clipped = r * a, rc * a
    if unclipped <= clipped:
        return unclipped, r * a
    return clipped, (r * a if lo < r < hi else 0.0)


def _random_inputs(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    lp = rng.uniform(-4, -0.05, N)
    # Ratios exp(lp - q) spread over [0.5, 1.6]: both clip sides of (0.8, 1.2) get hit.
    q = lp - np.log(rng.uniform(0.5, 1.6, N))
    x = {
        "target_tokens": rng.integers(0, 100, N),
        "weights": rng.normal(size=N),  # negative weights too
        "logprobs": q,
        "advantages": rng.normal(size=N),
        "sampled_mask": (rng.uniform(size=N) < 0.7).astype(np.float64),
    }
    return lp, x


CONFIGS = {"dro": {"beta": 0.3},
           # a cap inside the ratios' spread, so that both sides of it are hit
           "stable_reinforce": {"kl_coeff": 0.3, "clip_high_threshold": 1.2}}


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro",
                                     "stable_reinforce"])
def test_loss_and_grad_match_float64_reference(loss_fn):
    rng = np.random.default_rng(0)
    lp_np, x_np = _random_inputs(rng)
    cfg = resolve_loss_config(loss_fn, CONFIGS.get(loss_fn, {}))
    lp = torch.tensor(lp_np, dtype=torch.float32, requires_grad=True)
    inputs = {k: torch.tensor(v, dtype=torch.float32) for k, v in x_np.items()}
    per_token = token_losses(loss_fn, lp, inputs, cfg)  # [N]
    per_token.sum().backward()

    # The reference sees the same fp32-rounded inputs, computed in float64.
    lp64 = lp.detach().double().numpy()
    x64 = {k: v.double().numpy() for k, v in inputs.items()}
    ref = [
        _ref_objective_and_grad(loss_fn, lp64[i], {k: float(v[i]) for k, v in x64.items()}, cfg)
        for i in range(N)
    ]
    ref_loss = -np.array([o for o, _ in ref])
    ref_grad = -np.array([g for _, g in ref])
    assert per_token.shape == (N,)
    np.testing.assert_allclose(per_token.detach().double().numpy(), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lp.grad.double().numpy(), ref_grad, rtol=1e-5, atol=1e-6)


def test_ppo_and_cispo_inputs_hit_both_clip_sides():
    lp, x = _random_inputs(np.random.default_rng(0))
    r = np.exp(lp - x["logprobs"])
    assert (r < 0.8).any() and (r > 1.2).any() and ((r > 0.8) & (r < 1.2)).any()


def test_unknown_loss_and_inverted_clip_range_are_user_errors():
    lp = torch.zeros(3)
    x = {"logprobs": torch.zeros(3), "advantages": torch.ones(3)}
    with pytest.raises(UserError, match="nope"):
        token_losses("nope", lp, x, {})
    with pytest.raises(UserError, match="clip_low_threshold=1.5"):
        token_losses("ppo", lp, x, {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2})


def _data(seed: int, rows: int) -> tuple[list[list[int]], list[list[int]], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens, targets, weights = [], [], []
    for i in range(rows):
        n = 6 + 3 * i
        seq = torch.randint(0, 512, (n + 1,), generator=g).tolist()
        tokens.append(seq[:-1])
        targets.append(seq[1:])
        weights.append(torch.randn(n, generator=g))
    return tokens, targets, weights


def _train_adapter(model, slot: int, seed: int) -> None:
    """Add an adapter with a non-zero B (so A gets gradients too)."""
    model.add_adapter(slot, AdapterSpec(rank=4, alpha=8.0), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.adapter_parameters(slot):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_cross_entropy_through_model_matches_float64_log_softmax(tiny_model):
    _train_adapter(tiny_model, 0, seed=1)
    tokens, targets, weights = _data(0, rows=2)
    lps = tiny_model.target_logprobs(tokens, targets, [0, 0])
    loss = sum(
        token_losses("cross_entropy", lp, {"weights": w}, {}).sum()
        for lp, w in zip(lps, weights, strict=True)
    )
    loss.backward()
    grads = [p.grad.clone() for p in tiny_model.adapter_parameters(0)]

    # Recompute in float64: the adapter weights, the base model and the loss all in double.
    model = tiny_model
    model.hf.double()
    params64 = [p.detach().double().requires_grad_(True) for p in model.adapter_parameters(0)]
    pairs = zip(params64[::2], params64[1::2], strict=True)
    for w, (A, B) in zip(model.adapter_weights(0).values(), pairs, strict=True):
        w.A, w.B = A, B
    ref = 0.0
    for t, y, w in zip(tokens, targets, weights, strict=True):
        mask = torch.ones(1, len(t), dtype=torch.long)
        logits, _ = model.forward_logits(torch.tensor([t]), mask, [0])  # [1, S, V]
        logp = torch.log_softmax(logits[0], dim=-1)  # [S, V], float64
        ref = ref - (logp[torch.arange(len(y)), torch.tensor(y)] * w.double()).sum()
    ref.backward()
    assert logits.dtype == torch.float64
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g32, p64 in zip(grads, params64, strict=True):
        torch.testing.assert_close(g32.double(), p64.grad, rtol=1e-4, atol=1e-6)


def test_multi_adapter_grads_are_isolated(tiny_model):
    _train_adapter(tiny_model, 0, seed=1)
    _train_adapter(tiny_model, 1, seed=2)
    tokens, targets, weights = _data(3, rows=4)
    slots = [0, 1, 0, 1]

    def grads_of_slot0(rows: list[int]) -> list[torch.Tensor]:
        lps = tiny_model.target_logprobs(
            [tokens[i] for i in rows], [targets[i] for i in rows], [slots[i] for i in rows]
        )
        loss = sum(
            token_losses("cross_entropy", lp, {"weights": weights[i]}, {}).sum()
            for lp, i in zip(lps, rows, strict=True)
        )
        loss.backward()
        grads = [p.grad.clone() for p in tiny_model.adapter_parameters(0)]
        for s in (0, 1):
            for p in tiny_model.adapter_parameters(s):
                p.grad = None
        return grads

    mixed = grads_of_slot0([0, 1, 2, 3])
    alone = grads_of_slot0([0, 2])
    assert all(g.abs().sum() > 0 for g in alone)
    for gm, ga in zip(mixed, alone, strict=True):
        torch.testing.assert_close(gm, ga, rtol=0, atol=1e-6)


def _gspo_reference(lp: np.ndarray, x: dict[str, np.ndarray], lo: float, hi: float):
    """The datum's per-token gspo objective and d/d(lp), by hand in float64."""
    mask = x["sequence_ratio_mask"] != 0
    s = math.exp(float(np.mean((lp - x["logprobs"])[mask]))) if mask.any() else 1.0
    objective, grad = [], []
    for a in x["advantages"]:
        sc = min(max(s, lo), hi)
        if s * a <= sc * a:  # the unclipped branch decides: gradient s * A through lp_t
            objective.append(s * a)
            grad.append(s * a)
        else:
            objective.append(sc * a)
            grad.append(s * a if lo < s < hi else 0.0)
    return np.array(objective), np.array(grad)


@pytest.mark.parametrize("shift", [0.0, 0.3, -0.4])  # inside, above and below the clip range
def test_gspo_matches_float64_reference(shift):
    rng = np.random.default_rng(1)
    lp_np = rng.uniform(-4, -0.05, N)
    x_np = {"logprobs": lp_np - shift + rng.normal(0, 0.05, N),
            "advantages": rng.normal(size=N),
            "sequence_ratio_mask": (np.arange(N) >= 10).astype(np.float64)}
    cfg = resolve_loss_config("gspo", {})
    lp = torch.tensor(lp_np, dtype=torch.float32, requires_grad=True)
    inputs = {k: torch.tensor(v, dtype=torch.float32) for k, v in x_np.items()}
    inputs |= ROW_STATS["gspo"](lp.detach(), inputs, {})
    per_token = token_losses("gspo", lp, inputs, cfg)
    per_token.sum().backward()
    x64 = {k: v.double().numpy() for k, v in inputs.items()}
    objective, grad = _gspo_reference(lp.detach().double().numpy(), x64,
                                      cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    np.testing.assert_allclose(per_token.detach().double().numpy(), -objective, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(lp.grad.double().numpy(), -grad, rtol=1e-5, atol=1e-6)


def test_gspo_through_the_chunked_pass_equals_the_whole_sequence_formula(tiny_model):
    """packed_pass with the whole-row statistics first and 5-token loss chunks (rows cut
    across chunks) gives the losses and adapter gradients of the formula applied to each
    whole sequence with autograd."""
    _train_adapter(tiny_model, 0, seed=1)
    tokens, targets, _ = _data(5, rows=3)
    g = torch.Generator().manual_seed(9)
    inputs = [{"logprobs": -torch.rand(len(t), generator=g) * 3 - 4.0,
               "advantages": torch.randn(len(t), generator=g),
               "sequence_ratio_mask": (torch.arange(len(t)) >= 2).float()} for t in tokens]
    cfg = resolve_loss_config("gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5})
    rows = [dict(x) for x in inputs]

    def prepare(lps):
        for x, lp in zip(rows, lps, strict=True):
            x.update(ROW_STATS["gspo"](lp, x, {}))

    def row_loss(k, offset, lp):
        part = {name: t[offset:offset + len(lp)] for name, t in rows[k].items()}
        return token_losses("gspo", lp, part, cfg)

    out = tiny_model.packed_pass(tokens, targets, [0] * 3, [True] * 3, row_loss,
                                 chunk_tokens=5, prepare=prepare)
    # the reference: the docs' form on each whole sequence, differentiated by autograd
    lps = tiny_model.target_logprobs(tokens, targets, [0, 0, 0])
    total = 0.0
    for lp, x, losses in zip(lps, inputs, out.losses, strict=True):
        mask = x["sequence_ratio_mask"] != 0
        log_ratio = (lp.detach() - x["logprobs"])[mask].mean()
        s = torch.exp(log_ratio + lp - lp.detach())
        ref = -torch.minimum(s * x["advantages"], s.clamp(0.5, 1.5) * x["advantages"])
        torch.testing.assert_close(losses, ref.detach(), rtol=1e-4, atol=1e-5)
        total = total + ref.sum()
    total.backward()
    assert any(p.grad.abs().sum() > 0 for p in tiny_model.adapter_parameters(0))
    for got, p in zip(out.grads[0], tiny_model.adapter_parameters(0), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-6)
