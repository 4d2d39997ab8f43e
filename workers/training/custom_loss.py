"""The interpreter of server-side custom losses: runs a graph that protocol.custom_graph
accepted, node by node, calling only the torch functions and tensor methods it names (never
code the client sent: a target is looked up in those lists, then on torch, math or
operator by name).

`run(nodes, inputs)` gives (loss, metrics) for one datum, differentiable in its inputs, as
the SDK's LossHandle gives them from the same graph client-side. A value the graph asks to
move to a device stays on the inputs' device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from protocol.custom_graph import ATTRIBUTES, DTYPES, FUNCTIONS, METHODS
from protocol.jobs import UserError

_ROOTS: dict[str, Any] = {"torch": torch, "math": math, "operator": operator}


def function(target: str) -> Callable[..., Any]:
    """The callable of an allowed call_function target."""
    if target not in FUNCTIONS:
        raise UserError(f"custom loss calls {target!r}, which the interpreter does not run")
    if target == "getattr":
        return _read_attribute
    root, *path = target.split(".")
    value = _ROOTS[root]
    for part in path:
        value = getattr(value, part)
    return value  # type: ignore[no-any-return]


def _read_attribute(obj: Any, name: str) -> Any:
    if name not in ATTRIBUTES:
        raise UserError(f"custom loss reads attribute {name!r}; allowed: {sorted(ATTRIBUTES)}")
    return getattr(obj, name)


def run(nodes: list[dict[str, Any]], inputs: list[torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    device = inputs[0].device
    env: dict[str, Any] = {}
    feed = iter(inputs)
    for node in nodes:
        op, target = node["op"], node["target"]
        args = [_value(a, env, device) for a in node.get("args", [])]
        kwargs = {k: _value(v, env, device) for k, v in node.get("kwargs", {}).items()}
        if op == "placeholder":
            env[node["name"]] = next(feed)
        elif op == "call_function":
            env[node["name"]] = function(target)(*args, **kwargs)
        elif op == "call_method":
            if target not in METHODS:
                raise UserError(f"custom loss calls tensor method {target!r}, which the "
                                "interpreter does not run")
            self, *rest = args
            env[node["name"]] = getattr(self, target)(*rest, **kwargs)
        elif op == "output":
            loss, metrics = args[0]
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise UserError(f"custom loss must return a scalar loss tensor, got "
                                f"{getattr(loss, 'shape', type(loss).__name__)}")
            return loss, dict(metrics)
        else:
            raise UserError(f"custom loss node op {op!r} is not run by the interpreter")
    raise UserError("custom loss graph has no output node")


def _value(encoded: Any, env: dict[str, Any], device: torch.device) -> Any:
    if isinstance(encoded, list):
        return [_value(x, env, device) for x in encoded]
    if not isinstance(encoded, dict):
        return encoded
    (kind, inner), = encoded.items()
    if kind == "ref":
        return env[inner]
    if kind == "tuple":
        return tuple(_value(x, env, device) for x in inner)
    if kind == "dict":
        return {k: _value(v, env, device) for k, v in inner.items()}
    if kind == "slice":
        return slice(*(_value(x, env, device) for x in inner))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "float":
        return float(inner)
    if kind == "dtype" and inner in DTYPES:
        return getattr(torch, inner)
    if kind == "device":
        return device
    if kind == "layout":
        return torch.strided
    if kind == "memory_format":
        return torch.contiguous_format
    raise UserError(f"custom loss argument {str(encoded)[:60]} is not an encoded value")
