"""Server-side custom losses: the graph `ServiceClient.create_custom_loss` uploads, checked
before it is stored. No torch here: the graph is plain data (the SDK's CustomLossGraph,
format 1, torch.fx's nodes in order), and nothing in it runs until the worker's interpreter
(workers/training/custom_loss.py) rebuilds it from the operations named below. An operation
that is not named is refused here, with its name.
"""

from __future__ import annotations

import re
from typing import Any

from protocol.errors import bad

MAX_NODES = 2000
MAX_INPUTS = 16
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")

_ELEMENTWISE = ("abs", "exp", "exp2", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt",
                "square", "sigmoid", "tanh", "relu", "sign", "neg", "reciprocal", "clamp",
                "clip", "clamp_min", "clamp_max", "pow", "minimum", "maximum", "where",
                "isfinite", "isnan", "nan_to_num", "logical_and", "logical_or", "logical_not",
                "mul", "add", "sub", "div", "true_divide", "floor", "ceil", "round")
_REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "logsumexp", "softmax",
               "log_softmax", "cumsum", "prod", "norm", "var", "std", "argmax", "argmin",
               "count_nonzero", "all", "any")
_SHAPES = ("stack", "cat", "gather", "flip", "reshape", "squeeze", "unsqueeze",
           "transpose", "narrow", "index_select", "masked_fill", "ones_like", "zeros_like",
           "full_like", "tensor", "arange", "zeros", "ones", "full", "numel", "broadcast_to")
# call_function targets (qualified names, as the SDK's encode_graph writes them)
FUNCTIONS = frozenset(
    [f"torch.{n}" for n in _ELEMENTWISE + _REDUCTIONS + _SHAPES]
    + [f"torch.nn.functional.{n}" for n in ("logsigmoid", "softplus", "relu", "softmax",
                                            "log_softmax", "sigmoid", "silu", "gelu")]
    + [f"operator.{n}" for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
                                 "neg", "pos", "abs", "getitem", "lt", "le", "gt", "ge",
                                 "eq", "ne", "and_", "or_", "xor", "invert", "matmul")]
    + [f"math.{n}" for n in ("exp", "log", "sqrt", "log1p", "expm1", "pow", "fabs")]
    + ["getattr"]  # torch.fx names builtins.getattr so
)
# call_method targets: torch.Tensor methods that compute (none leaves torch: no item, numpy)
METHODS = frozenset(
    _ELEMENTWISE + _REDUCTIONS
    + ("detach", "float", "double", "to", "type_as", "view", "reshape", "expand",
       "expand_as", "squeeze", "unsqueeze", "transpose", "flatten", "gather", "masked_fill",
       "size", "dim", "numel", "new_zeros", "new_ones", "new_full", "new_tensor", "flip",
       "t", "contiguous", "clone", "sum_to_size", "__getitem__", "eq", "ne", "lt", "le",
       "gt", "ge", "bool", "long", "int")
)
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T"})  # getattr(x, name)
CONSTANTS = frozenset({"ref", "tuple", "dict", "slice", "ellipsis", "float", "dtype",
                       "device", "layout", "memory_format"})
DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"})


def check_custom_loss(body: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a create_custom_loss body: {"name", "inputs", "nodes"}; a 400 that
    names the node and the operation for anything the interpreter would not run."""
    name = body.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise bad("name must be a string of 1 to 128 characters")
    inputs = body.get("inputs")
    if not (isinstance(inputs, list) and 0 < len(inputs) <= MAX_INPUTS):
        raise bad(f"inputs must list 1 to {MAX_INPUTS} inputs, logprobs first")
    for i, item in enumerate(inputs):
        ok = isinstance(item, dict) and isinstance(item.get("name"), str) \
            and INPUT_NAME.fullmatch(item["name"]) and item.get("rank") in (0, 1, 2)
        if not ok or (i == 0) != (item["name"] == "logprobs"):
            raise bad(f"inputs[{i}]={str(item)[:60]} must be {{name, rank 0-2}}, logprobs first "
                      "and only first")
    if inputs[0]["rank"] == 0:
        raise bad("logprobs has rank 1 ([T]) or 2 ([T, K])")
    graph = body.get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(graph, dict) or graph.get("format", 1) != 1 or not isinstance(nodes, list):
        raise bad("graph must be a CustomLossGraph of format 1 with a list of nodes")
    if not 0 < len(nodes) <= MAX_NODES:
        raise bad(f"graph has {len(nodes)} nodes; it may have 1 to {MAX_NODES}")
    _check_nodes(nodes, [i["name"] for i in inputs])
    return {"name": name, "inputs": inputs, "nodes": nodes}


def _check_nodes(nodes: list[Any], input_names: list[str]) -> None:
    seen: set[str] = set()
    placeholders, outputs = 0, 0
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise bad(f"graph node {i} is not a {{op, name, target, args, kwargs}} object")
        op, target, where = node.get("op"), node.get("target"), f"graph node {node['name']!r}"
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise bad(f"{where}: args must be a list and kwargs an object")
        if op == "placeholder":
            if placeholders >= len(input_names) or target != input_names[placeholders]:
                raise bad(f"{where}: placeholder {target!r} is not input {placeholders} of "
                          f"{input_names}")
            placeholders += 1
        elif op == "call_function":
            if target not in FUNCTIONS:
                raise bad(f"{where} calls {target!r}, which the server's custom loss "
                          "interpreter does not run")
            if target == "getattr" and (len(args) != 2 or args[1] not in ATTRIBUTES):
                raise bad(f"{where} reads attribute {str(args[1:])[:40]}; only "
                          f"{sorted(ATTRIBUTES)} may be read")
        elif op == "call_method":
            if target not in METHODS:
                raise bad(f"{where} calls tensor method {target!r}, which the server's custom "
                          "loss interpreter does not run")
        elif op == "output":
            outputs += 1
            _check_output(where, args)
        else:
            raise bad(f"{where}: op {op!r} is not run by the server (get_attr, call_module: "
                      "a custom loss reads only its inputs and calls torch functions)")
        for value in [*args, *kwargs.values()]:
            _check_arg(where, value, seen)
        seen.add(node["name"])
    if placeholders != len(input_names) or outputs != 1 or nodes[-1].get("op") != "output":
        raise bad(f"graph must read each of the {len(input_names)} inputs once and end in one "
                  "output")


def _check_arg(where: str, value: Any, seen: set[str], depth: int = 0) -> None:
    if depth > 8:
        raise bad(f"{where}: an argument nests deeper than 8 levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for item in value:
            _check_arg(where, item, seen, depth + 1)
        return
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in CONSTANTS):
        raise bad(f"{where}: argument {str(value)[:60]} is not an encoded value")
    kind, inner = next(iter(value.items()))
    if kind == "ref" and inner not in seen:
        raise bad(f"{where} refers to {str(inner)[:40]!r}, which no earlier node defines")
    if kind == "dtype" and inner not in DTYPES:
        raise bad(f"{where}: dtype {str(inner)[:20]!r} is not one of {sorted(DTYPES)}")
    if kind == "float" and inner not in ("inf", "-inf", "nan"):
        raise bad(f"{where}: float {str(inner)[:20]!r} must be inf, -inf or nan")
    if kind in ("tuple", "slice"):
        for item in inner if isinstance(inner, list) else [inner]:
            _check_arg(where, item, seen, depth + 1)
    if kind == "dict":
        if not isinstance(inner, dict):
            raise bad(f"{where}: an encoded dict must hold an object")
        for item in inner.values():
            _check_arg(where, item, seen, depth + 1)


def _check_output(where: str, args: list[Any]) -> None:
    out = args[0] if len(args) == 1 else None
    items = out.get("tuple") if isinstance(out, dict) else out
    if not (isinstance(items, list) and len(items) == 2 and isinstance(items[0], dict)
            and "ref" in items[0]):
        raise bad(f"{where}: the loss must return (loss tensor, metrics)")
    metrics = items[1].get("dict") if isinstance(items[1], dict) else None
    if not isinstance(metrics, dict):
        raise bad(f"{where}: the loss must return its metrics as a dict")
    for key, value in metrics.items():
        if not METRIC_KEY.fullmatch(key) or not (isinstance(value, dict) and "ref" in value):
            raise bad(f"{where}: metric {key[:70]!r} must be a tensor named custom/<name>:sum "
                      "or custom/<name>:mean")


def check_inputs(spec: dict[str, Any], index: int, n_tokens: int, inputs: dict[str, Any]
                 ) -> None:
    """A datum's loss_fn_inputs for a custom loss: target_tokens, and every input the graph
    reads at its declared rank ([] / [T] / [T, K], T the model input's length); logprobs take
    target_tokens' shape, so its rank is theirs."""
    from protocol.losses import ProtocolError

    want = {"target_tokens": spec["inputs"][0]["rank"]}
    want |= {i["name"]: i["rank"] for i in spec["inputs"][1:]}
    missing = sorted(set(want) - set(inputs))
    if missing:
        raise ProtocolError(f"data[{index}] lacks loss_fn_inputs {missing}, which custom loss "
                            f"{spec.get('name', '')!r} reads")
    for name, rank in want.items():
        shape = list(inputs[name].shape)
        if len(shape) != rank or (rank and shape[0] != n_tokens):
            raise ProtocolError(f"data[{index}].loss_fn_inputs[{name!r}] has shape {shape}; the "
                                f"custom loss declared rank {rank} with T = {n_tokens}")
