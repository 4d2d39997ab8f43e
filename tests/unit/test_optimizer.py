"""adamw_step against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW.

Run: python -m pytest tests/unit/test_optimizer.py -q
"""

from __future__ import annotations

import pytest
import torch

from protocol.jobs import UserError
from workers.training.optimizer import AdamState, adamw_step

HP = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 16), (32, 4), (4, 32), (16, 4)]
    return [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    # Large enough that a clip norm of 1.0 bites on every step.
    return [torch.randn(p.shape, generator=g) * 3 for p in params]


@pytest.mark.parametrize("clip", [0.0, 1.0, 1e6])
def test_matches_torch_adamw_over_steps(clip):
    ours, theirs = _params(0), _params(0)
    reference = torch.optim.AdamW(
        theirs,
        lr=HP["learning_rate"],
        betas=(HP["beta1"], HP["beta2"]),
        eps=HP["eps"],
        weight_decay=HP["weight_decay"],
        foreach=False,
    )
    state = None
    for step in range(6):
        grads = _grads(step, ours)
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        state, metrics = adamw_step(ours, state, **HP, grad_clip_norm=clip)
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs, clip if clip > 0 else float("inf"))
        reference.step()
        reference.zero_grad(set_to_none=True)
        assert metrics["grad_norm:mean"] == pytest.approx(float(ref_norm), rel=1e-6)
        assert metrics["learning_rate:mean"] == HP["learning_rate"]
        assert all(p.grad is None for p in ours)
    assert state.step == 6
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for i, q in enumerate(theirs):
        torch.testing.assert_close(
            state.exp_avg[i], reference.state[q]["exp_avg"], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            state.exp_avg_sq[i], reference.state[q]["exp_avg_sq"], rtol=0, atol=1e-6
        )


def test_missing_grad_counts_as_zero():
    params = _params(0)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones_like(params[0])
    state, _ = adamw_step(params, None, **HP, grad_clip_norm=0.0)
    # No grad: only the decoupled weight decay moves the parameter; its moments stay zero.
    decay = 1 - HP["learning_rate"] * HP["weight_decay"]
    torch.testing.assert_close(params[1].detach(), before[1] * decay)
    assert state.exp_avg[1].abs().sum() == 0
    assert state.exp_avg[0].abs().sum() > 0


def test_state_round_trips_through_tensors():
    params = _params(0)
    for p, g in zip(params, _grads(0, params), strict=True):
        p.grad = g
    state, _ = adamw_step(params, None, **HP, grad_clip_norm=1.0)
    flat = state.to_tensors()
    assert flat["step"].tolist() == [1]
    again = AdamState.from_tensors(flat)
    assert again.step == 1
    for a, b in zip(
        state.exp_avg + state.exp_avg_sq, again.exp_avg + again.exp_avg_sq, strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="exp_avg_sq.0"):
        AdamState.from_tensors({k: v for k, v in flat.items() if k != "exp_avg_sq.0"})


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", -1e-3),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("eps", 0.0),
        ("weight_decay", -0.5),
        ("grad_clip_norm", -1.0),
        ("learning_rate", float("nan")),
    ],
)
def test_bad_hyperparameters_are_user_errors(name, value):
    hp = {**HP, "grad_clip_norm": 0.0, name: value}
    with pytest.raises(UserError, match=f"adam_params.{name}={value}"):
        adamw_step(_params(0), None, **hp)


def test_state_size_must_match_params():
    state = AdamState.zeros(_params(0)[:2])
    with pytest.raises(UserError, match="holds 2 tensors; the adapter has 4"):
        adamw_step(_params(0), state, **HP, grad_clip_norm=0.0)
