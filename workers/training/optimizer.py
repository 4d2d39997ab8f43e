"""AdamW for one adapter's parameters, with the state held outside any torch.optim object.

Each adapter keeps its own `AdamState` (step count and moments), so adapters can be moved
between slots, checkpointed and restored without a torch optimizer per adapter. The update
is torch.optim.AdamW's single-tensor formula, and clipping is
torch.nn.utils.clip_grad_norm_'s, so results match `clip_grad_norm_` + `AdamW` to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from protocol.jobs import UserError


@dataclass
class AdamState:
    """AdamW moments, one pair per parameter, in the order of the parameter list."""

    step: int
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]

    @classmethod
    def zeros(cls, params: list[torch.Tensor]) -> AdamState:
        return cls(
            step=0,
            exp_avg=[torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            exp_avg_sq=[torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict for safetensors: every "exp_avg.{i}", every "exp_avg_sq.{i}", then
        "step" [1] (the moments in the order a packed snapshot holds them, so that they are
        written in one piece: workers/tensorfile.py)."""
        out = {f"exp_avg.{i}": m.detach().cpu() for i, m in enumerate(self.exp_avg)}
        out |= {f"exp_avg_sq.{i}": v.detach().cpu() for i, v in enumerate(self.exp_avg_sq)}
        out["step"] = torch.tensor([self.step], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> AdamState:
        """Inverse of `to_tensors`; raises UserError when the dict is not one of ours."""
        n = sum(1 for k in tensors if k.startswith("exp_avg."))
        expected = {"step"} | {f"exp_avg.{i}" for i in range(n)}
        expected |= {f"exp_avg_sq.{i}" for i in range(n)}
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[:5]
            raise UserError(f"optimizer state has missing or unexpected entries {odd}")
        return cls(
            step=int(tensors["step"].reshape(-1)[0]),
            exp_avg=[tensors[f"exp_avg.{i}"].to(device, torch.float32) for i in range(n)],
            exp_avg_sq=[tensors[f"exp_avg_sq.{i}"].to(device, torch.float32) for i in range(n)],
        )


def adamw_step(
    params: list[torch.Tensor],
    state: AdamState | None,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
    norm: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[AdamState, dict[str, float]]:
    """One AdamW step on `params` from their `.grad`, in place; the grads are then cleared.

    A parameter without a grad counts as a zero grad (it still decays and its moments still
    move), unlike torch.optim, which skips it: an adapter's step is one step for all of it.
    Returns the new state and metrics named "name:reduction". `norm`: the global gradient
    norm's rule when it is not the plain one (tensor parallelism: `tp.grad_norm`).
    """
    _check_hyperparameters(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)
    state = AdamState.zeros(params) if state is None else state
    _match_params(state, params)
    with torch.no_grad():
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        grad_norm = _clip_(grads, grad_clip_norm, norm)
        state.step += 1
        _adamw_update(params, grads, state.exp_avg, state.exp_avg_sq, state.step,
                      learning_rate, beta1, beta2, eps, weight_decay)
    for p in params:
        p.grad = None
    return state, {"grad_norm:mean": grad_norm, "learning_rate:mean": float(learning_rate)}


def _match_params(state: AdamState, params: list[torch.Tensor]) -> None:
    """Check the state fits `params`; a state restored from disk is moved to their device."""
    if len(state.exp_avg) != len(params):
        raise UserError(
            f"optimizer state holds {len(state.exp_avg)} tensors; the adapter has {len(params)}"
        )
    for i, p in enumerate(params):
        if state.exp_avg[i].shape != p.shape:
            raise UserError(
                f"optimizer state tensor {i} has shape {list(state.exp_avg[i].shape)}; "
                f"the adapter's has {list(p.shape)}"
            )
        if state.exp_avg[i].device != p.device:
            state.exp_avg[i] = state.exp_avg[i].to(p.device)
            state.exp_avg_sq[i] = state.exp_avg_sq[i].to(p.device)


def _adamw_update(
    p: list[torch.Tensor],
    g: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """torch.optim.AdamW's update (decoupled decay, bias-corrected moments) on every tensor
    of the adapter at once: a few multi-tensor kernels instead of ~10 launches per tensor."""
    if not p:
        return
    torch._foreach_mul_(p, 1 - lr * weight_decay)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p, m, denom, value=-lr / (1 - beta1**step))


def _clip_(grads: list[torch.Tensor], max_norm: float,
           norm: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> float:
    """Global L2 norm of `grads` before clipping; scales them in place if it exceeds max_norm.

    clip_grad_norm_'s rule: coef = max_norm / (norm + 1e-6), applied only when < 1.
    max_norm == 0 turns clipping off.
    """
    if not grads:
        return 0.0
    if norm is not None:
        total = norm(grads)
    else:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return float(total)


def _check_hyperparameters(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, clip: float
) -> None:
    # Written as `not (ok)` so that NaN fails too.
    checks = [
        ("learning_rate", lr, lr >= 0, ">= 0"),
        ("beta1", beta1, 0 <= beta1 < 1, "in [0, 1)"),
        ("beta2", beta2, 0 <= beta2 < 1, "in [0, 1)"),
        ("eps", eps, eps > 0, "> 0"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ("grad_clip_norm", clip, clip >= 0, ">= 0 (0 turns clipping off)"),
    ]
    for name, value, ok, rule in checks:
        if not ok or not math.isfinite(value):
            raise UserError(f"adam_params.{name}={value} must be {rule}")
