"""The loss table, shared by the API (validation) and the worker (compute). No torch.

Loss functions: the `loss_fn_inputs` each one needs and the `loss_fn_config` keys it
accepts, with their defaults. Every per-token input is a 1-D array as long as the datum's
model input; losses are sums over tokens and datums (no normalisation), as in Tinker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

RL_INPUTS = ("target_tokens", "logprobs", "advantages")
CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@dataclass(frozen=True)
class LossSpec:
    inputs: tuple[str, ...]
    config: dict[str, float] = field(default_factory=dict)  # accepted keys -> default


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("target_tokens", "weights")),
    "importance_sampling": LossSpec(RL_INPUTS),
    "ppo": LossSpec(RL_INPUTS, dict(CLIP_DEFAULTS)),
    "cispo": LossSpec(RL_INPUTS, dict(CLIP_DEFAULTS)),
    # Tinker does not publish dro's default beta; 0.05 is ours (stated in the README).
    "dro": LossSpec(RL_INPUTS, {"beta": 0.05}),
    # `sampled_mask` and the sampled positions of `logprobs` come from the server's record
    # of the sampled sequences (protocol.provenance), never from the client. Tinker does
    # not publish stable_reinforce's formula; this one is ours (workers/training/losses.py).
    # gspo's sequence ratio over the positions sequence_ratio_mask marks (the cookbook: the
    # sampled tokens); Tinker publishes no default thresholds, so PPO's are used.
    "gspo": LossSpec(RL_INPUTS + ("sequence_ratio_mask",), dict(CLIP_DEFAULTS)),
    "stable_reinforce": LossSpec(RL_INPUTS + ("sampled_mask",),
                                 {"kl_coeff": 0.0, "clip_high_threshold": 2.0}),
}
# A server-side custom loss (create_custom_loss): the API puts its graph in the config as
# JSON text ("custom_loss"), so the payload is whole; its inputs are the graph's.
CUSTOM = "custom"
# Losses whose data must name recorded samples (Datum.with_provenance): the API resolves
# them before the call is stored.
PROVENANCE_LOSSES = frozenset({"stable_reinforce"})

# Inputs that may ride along with any loss and are ignored when the loss does not use them
# (the cookbook sends `mask` with RL data).
OPTIONAL_INPUTS = frozenset({"mask"})
# Losses whose target_tokens and weights may be [N, K]: K candidate tokens per position, each
# with its own weight (top-k distillation); the loss sums over both axes.
TOPK_LOSSES = frozenset({"cross_entropy"})
MAX_TOPK = 128
INTEGER_INPUTS = frozenset({"target_tokens"})


class ProtocolError(ValueError):
    """Input that breaks a protocol rule; the message names the value and the limit."""


def resolve_loss_config(loss_fn: str, config: dict[str, float | str]) -> dict[str, Any]:
    """The loss's full config (defaults filled in); unknown names raise ProtocolError. A
    custom loss's is {"custom_loss": {"inputs", "nodes"}}."""
    if loss_fn == CUSTOM:
        graph = config.get("custom_loss")
        if not isinstance(graph, str):
            raise ProtocolError("loss_fn 'custom' runs a loss made by create_custom_loss: "
                                "send its loss_id in loss_fn_config")
        return {"custom_loss": json.loads(graph)}
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise ProtocolError(f"unknown loss_fn {loss_fn!r}; supported: {sorted(LOSSES)}")
    unknown = sorted(set(config) - set(spec.config))
    if unknown:
        allowed = sorted(spec.config) or "none"
        raise ProtocolError(
            f"loss_fn_config keys {unknown} are not accepted by {loss_fn!r} (accepted: {allowed})"
        )
    resolved = dict(spec.config)
    for key, value in config.items():
        if isinstance(value, str):
            raise ProtocolError(f"loss_fn_config[{key!r}]={value!r} must be a number")
        resolved[key] = float(value)
    return resolved


def check_loss_inputs(loss_fn: str, index: int, n_tokens: int, inputs: dict) -> None:
    """Every required input present, 1-D, as long as the datum; nothing unknown. (A custom
    loss's inputs are checked against its graph: protocol.custom_graph.check_inputs.)"""
    if loss_fn == CUSTOM:
        return
    spec = LOSSES[loss_fn]
    missing = [k for k in spec.inputs if k not in inputs]
    if missing:
        raise ProtocolError(f"data[{index}] lacks loss_fn_inputs {missing} needed by {loss_fn!r}")
    unknown = sorted(set(inputs) - set(spec.inputs) - OPTIONAL_INPUTS)
    if unknown:
        raise ProtocolError(
            f"data[{index}] has loss_fn_inputs {unknown} that {loss_fn!r} does not take "
            f"(it takes {list(spec.inputs)})"
        )
    if loss_fn in TOPK_LOSSES and inputs["target_tokens"].ndim == 2:
        _check_topk(index, n_tokens, inputs)
        return
    for name, arr in inputs.items():
        if arr.ndim != 1 or arr.shape[0] != n_tokens:
            raise ProtocolError(
                f"data[{index}].loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; it must be "
                f"[{n_tokens}], the length of the model input"
            )


def _check_topk(index: int, n_tokens: int, inputs: dict) -> None:
    targets = inputs["target_tokens"]
    k = targets.shape[1]
    if not 1 <= k <= MAX_TOPK:
        raise ProtocolError(f"data[{index}].loss_fn_inputs['target_tokens'] has {k} candidates "
                            f"per position; at most {MAX_TOPK}")
    for name, arr in inputs.items():
        want = [n_tokens, k] if name in ("target_tokens", "weights") else [n_tokens]
        if list(arr.shape) != want:
            raise ProtocolError(
                f"data[{index}].loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; with "
                f"[N, K] targets it must be {want}")
