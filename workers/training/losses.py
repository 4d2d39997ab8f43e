"""Tinker's loss functions as per-token losses over one datum.

Notation (all [N], one entry per target token of the datum):
  lp  learner log-probability of the target token (differentiable)
  q   sampler log-probability (`loss_fn_inputs["logprobs"]`)
  A   advantages;  r = exp(lp - q), the importance ratio;  sg() stops the gradient

  cross_entropy        -(lp * w)   (top-k targets [N, K]: -sum_k lp_k * w_k per position)
  importance_sampling  -(r * A)
  ppo                  -min(r * A, clip(r, lo, hi) * A)
  cispo                -(sg(clip(r, lo, hi)) * lp * A)
  dro                  -(lp * A - beta/2 * (lp - q)**2)
  stable_reinforce     m * (-(sg(min(r, c)) * lp * A) + kl_coeff * (r - 1 - log r))
      where q is the sampler's own log-prob, recorded when it sampled (not the client's
      copy), m is 1 on sampled target tokens and 0 on prompt ones, c is
      clip_high_threshold (default 2) and kl_coeff defaults to 0. The first term is
      REINFORCE with the importance weight truncated at c and held constant, so a token
      the learner now favours far more than the sampler did cannot blow the step up; the
      second is the k3 estimate of KL(sampler || learner) from the sampled tokens, whose
      gradient (r - 1) pulls the learner back toward the sampling policy. Tinker does not
      publish its formula; this is tinkerq's.
  gspo                 -min(s_t * A, clip(s_t, lo, hi) * A)
      with the sequence ratio s = exp(mean over M of sg(lp) - q), M the positions whose
      `sequence_ratio_mask` is non-zero (s = 1 when M is empty), and the per-token
      s_t = s * exp(lp - sg(lp)): equal to s, with gradient s through its own token only
      (the Tinker docs' GSPO-token form). s needs the whole datum's log-probs before any
      token's loss: `ROW_STATS` computes it first (per-token input `sequence_log_ratio`).
  custom               g * (lp - sg(lp)) + f / N, for a create_custom_loss graph f of the
      datum's log-probs and inputs, g = df/dlp at sg(lp) (`ROW_STATS` again): the sum is f
      and the gradient g, as the SDK's client-side forward_backward_custom computes them,
      in one pass.

Each loss is `-objective`, per token. The datum's loss is `token_losses(...).sum()` and the
batch loss is the sum over datums: Tinker does no normalisation, so neither do we. The
per-token values are also what forward_backward reports as the elementwise loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from protocol.jobs import UserError
from protocol.losses import CUSTOM
from workers.training import custom_loss

Inputs = dict[str, torch.Tensor]
Config = dict[str, Any]  # floats; a custom loss's {"custom_loss": {"inputs", "nodes"}}


def _cross_entropy(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    # Weights may be any real number (negative ones push a token down). Top-k targets:
    # lp and weights [N, K], summed over the K candidates of each position.
    loss = -(lp * x["weights"])
    return loss.sum(-1) if loss.dim() == 2 else loss


def _importance_sampling(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    return -(_ratio(lp, x) * x["advantages"])


def _ppo(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    r, adv = _ratio(lp, x), x["advantages"]
    clipped = r.clamp(*_clip_range(cfg))
    return -torch.minimum(r * adv, clipped * adv)


def _cispo(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    # The clipped ratio is a constant weight: the gradient flows through lp alone.
    weight = _ratio(lp, x).clamp(*_clip_range(cfg)).detach()
    return -(weight * lp * x["advantages"])


def _dro(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    penalty = 0.5 * cfg["beta"] * (lp - x["logprobs"]) ** 2
    return -(lp * x["advantages"] - penalty)


def _stable_reinforce(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    log_r = lp - x["logprobs"]
    r = torch.exp(log_r)
    weight = r.clamp(max=cfg["clip_high_threshold"]).detach()
    kl = r - 1 - log_r
    return x["sampled_mask"] * (-(weight * lp * x["advantages"]) + cfg["kl_coeff"] * kl)


def _gspo(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    s = torch.exp(x["sequence_log_ratio"] + lp - lp.detach())
    adv = x["advantages"]
    return -torch.minimum(s * adv, s.clamp(*_clip_range(cfg)) * adv)


def _custom(lp: torch.Tensor, x: Inputs, cfg: Config) -> torch.Tensor:
    """A create_custom_loss graph f, through its gradient g = df/dlp at this datum's
    log-probs (`_custom_stats`): each token's term has g's gradient and f's share of the
    value, so the chunked pass gives f's gradients and f itself as loss:sum."""
    linear = x["custom_grad"] * (lp - lp.detach())
    return linear.reshape(lp.shape[0], -1).sum(-1) + x["custom_share"]


def _custom_stats(lp: torch.Tensor, x: Inputs, cfg: Config) -> Inputs:
    """f and g = df/dlp for one datum, on its whole detached log-probs in float64; its
    metrics ride along under `custom_metrics` (the trainer collects them)."""
    spec = cfg["custom_loss"]
    leaf = lp.detach().double().requires_grad_()
    args = [x[i["name"]].double() if x[i["name"]].is_floating_point() else x[i["name"]]
            for i in spec["inputs"][1:]]
    with torch.enable_grad():
        value, metrics = custom_loss.run(spec["nodes"], [leaf, *args])
        (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(leaf)
    n = lp.shape[0]
    return {"custom_grad": grad.to(lp.dtype), "custom_share": (value.detach() / n).expand(n)
            .to(lp.dtype), "custom_metrics": {k: float(v.detach()) for k, v in metrics.items()}}


def _gspo_stats(lp: torch.Tensor, x: Inputs, cfg: Config) -> Inputs:
    """The datum's log sequence ratio from its whole (detached) log-probs, as a per-token
    input the element-wise `_gspo` can slice."""
    mask = x["sequence_ratio_mask"].to(lp) != 0
    diff = (lp.detach() - x["logprobs"].to(lp))[mask]
    log_ratio = diff.mean() if diff.numel() else lp.new_zeros(())
    return {"sequence_log_ratio": log_ratio.expand(lp.shape[0]).clone()}


LOSS_FNS: dict[str, Callable[[torch.Tensor, Inputs, Config], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
    "stable_reinforce": _stable_reinforce,
    "gspo": _gspo,
    CUSTOM: _custom,
}
# Losses that need per-datum statistics of the whole datum's log-probs before any token's
# loss: (lp [N] detached, inputs, config) -> extra per-token inputs.
ROW_STATS: dict[str, Callable[[torch.Tensor, Inputs, Config], Inputs]] = {
    "gspo": _gspo_stats, CUSTOM: _custom_stats}


def token_losses(loss_fn: str, lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """Per-token loss [N] of one datum; `config` is already resolved with its defaults."""
    fn = LOSS_FNS.get(loss_fn)
    if fn is None:
        raise UserError(f"unknown loss_fn {loss_fn!r}; supported: {sorted(LOSS_FNS)}")
    # Inputs arrive as CPU tensors from the wire; compute where lp lives, in its dtype.
    # Token ids are not loss terms, so they stay behind.
    x = {k: v.to(lp) for k, v in inputs.items() if k != "target_tokens"}
    return fn(lp, x, config)


def _ratio(lp: torch.Tensor, x: Inputs) -> torch.Tensor:
    return torch.exp(lp - x["logprobs"])  # [N]


def _clip_range(cfg: Config) -> tuple[float, float]:
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    if not lo <= hi:
        raise UserError(f"clip_low_threshold={lo} must not exceed clip_high_threshold={hi}")
    return lo, hi
