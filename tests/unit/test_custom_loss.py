"""Server-side custom losses: graphs the SDK traces and encodes (its own trace_loss and
encode_graph), checked by protocol.custom_graph and run by the worker's interpreter, give the
traced function's loss, metrics and gradients; operations outside the lists are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from protocol.custom_graph import check_custom_loss
from protocol.errors import RequestError
from workers.training import custom_loss


def neg_ll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss}


def clipped(logprobs, old, advantages):
    ratio = torch.exp(logprobs - old)
    loss = -torch.minimum(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean()}


def shaped(logprobs, weights):
    n = logprobs.shape[0]
    return -(logprobs[1:] * weights[1:]).sum() / n + logprobs.detach().abs().mean() * 0, {}


def topk(logprobs, weights):
    return -(torch.logsumexp(logprobs, dim=-1) * weights).sum(), {}


CASES = {
    "neg_ll": (neg_ll, {"logprobs": 1, "weights": 1}),
    "clipped": (clipped, {"logprobs": 1, "old": 1, "advantages": 1}),
    "shaped": (shaped, {"logprobs": 1, "weights": 1}),
    "topk": (topk, {"logprobs": 2, "weights": 1}),
}


def upload(fn, ranks) -> dict:
    handle = trace_loss(fn, ranks, "s")
    body = {"name": handle.name, "custom_loss_seq_id": 0, "session_id": "s",
            "inputs": [i.model_dump() for i in handle.inputs],
            "graph": encode_graph(handle).model_dump(mode="json")}
    return body | {"handle": handle}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_interpreter_gives_the_traced_loss_and_its_gradients(case):
    fn, ranks = CASES[case]
    body = upload(fn, ranks)
    stored = check_custom_loss(body)
    gen = torch.Generator().manual_seed(0)
    shapes = {1: (7,), 2: (7, 3)}
    inputs = [torch.randn(shapes[r] if r else (), generator=gen, dtype=torch.float64)
              for r in ranks.values()]
    inputs[0] = -inputs[0].abs()  # log-probs
    ours = inputs[0].clone().requires_grad_()
    theirs = inputs[0].clone().requires_grad_()
    loss, metrics = custom_loss.run(stored["nodes"], [ours, *inputs[1:]])
    want, want_metrics = body["handle"].graph(theirs, *inputs[1:])
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key])


def _bad(body: dict, change) -> str:
    body = copy.deepcopy({k: v for k, v in body.items() if k != "handle"})
    change(body["graph"]["nodes"])
    with pytest.raises(RequestError) as e:
        check_custom_loss(body)
    assert e.value.status == 400
    return e.value.message


def test_operations_outside_the_lists_are_refused_by_name():
    body = upload(*CASES["clipped"])
    exp = next(i for i, n in enumerate(body["graph"]["nodes"]) if n["target"] == "torch.exp")

    def call(target):
        return lambda nodes: nodes[exp].update(target=target)

    assert "'os.system'" in _bad(body, call("os.system"))
    assert "'builtins.eval'" in _bad(body, call("builtins.eval"))

    def method(nodes):
        nodes[exp].update(op="call_method", target="numpy")
    assert "tensor method 'numpy'" in _bad(body, method)

    def module(nodes):
        nodes[exp].update(op="call_module", target="linear")
    assert "call_module" in _bad(body, module)

    def dangling(nodes):
        nodes[exp]["args"] = [{"ref": "later_node"}]
    assert "'later_node'" in _bad(body, dangling)

    def metric(nodes):
        nodes[-1]["args"][0]["tuple"][1] = {"dict": {"loss": {"ref": nodes[exp]["name"]}}}
    assert "custom/<name>:sum" in _bad(body, metric)
    with pytest.raises(RequestError, match="logprobs first"):
        check_custom_loss({**body, "inputs": [{"name": "weights", "rank": 1}]})


def _fwdbwd(model_id: str, seq: int, datums, loss_fn: str, config: dict) -> bytes:
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq,
        forward_backward_input=types.ForwardBackwardInput(data=datums, loss_fn=loss_fn,
                                                          loss_fn_config=config))
    return forward_backward_request_to_proto(request).SerializeToString()


@pytest.mark.parametrize("case, builtin", [("neg_ll", "cross_entropy"), ("clipped", "ppo")])
def test_a_custom_loss_trains_as_its_builtin_twin(tiny_model, tmp_path, case, builtin):
    """The graph of -(lp * w).sum() (or PPO's clipped objective) in the trainer's one pass
    gives the built-in loss's value and gradients, and its metrics beside loss:sum."""
    import json

    import numpy as np
    from tinker import types
    from tinker.proto.response_conv import deserialize_forward_backward_output

    from config import load_settings
    from tests.unit.test_executor import create, job
    from workers.executor import Executor
    from workers.scheduler import Plan

    ex = Executor(tiny_model, load_settings(env={}, data_dir=str(tmp_path), max_lora_adapters=2,
                                            max_models=2), decode=lambda ids: "",
                  eos_token_ids=[511])
    for m in ("builtin", "custom"):
        create(ex, m, seed=5)
    rng = np.random.default_rng(0)
    datums = []
    for n in (6, 9):
        tokens = rng.integers(1, 500, n + 1)
        inputs = {"target_tokens": tokens[1:].astype(np.int64)}
        if case == "neg_ll":
            inputs["weights"] = rng.random(n).astype(np.float32)
        else:
            inputs["logprobs"] = -rng.random(n).astype(np.float32) * 5
            inputs["advantages"] = rng.standard_normal(n).astype(np.float32)
        datums.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                                  loss_fn_inputs=inputs))
    body = upload(*CASES[case])
    spec = check_custom_loss(body)
    mine = datums
    if case == "clipped":  # the graph reads `old`: the same log-probs under that name
        mine = [types.Datum(model_input=d.model_input, loss_fn_inputs={
            **d.loss_fn_inputs, "old": d.loss_fn_inputs["logprobs"]}) for d in datums]
    plan = Plan(train=[
        job("forward_backward", _fwdbwd("builtin", 1, datums, builtin, {}), "builtin", 1),
        job("forward_backward", _fwdbwd("custom", 1, mine, "custom",
                                        {"custom_loss": json.dumps(spec)}), "custom", 1)])
    out = ex.run(plan)
    assert all(o.ok for o in out.values()), {k: o.error for k, o in out.items()}
    ours = deserialize_forward_backward_output(out["forward_backward-custom-1"].proto)
    theirs = deserialize_forward_backward_output(out["forward_backward-builtin-1"].proto)
    assert ours.metrics["loss:sum"] == pytest.approx(theirs.metrics["loss:sum"], rel=1e-5)
    if case == "neg_ll":
        assert ours.metrics["custom/nll:sum"] == pytest.approx(ours.metrics["loss:sum"], rel=1e-6)
    else:
        assert 0 < ours.metrics["custom/ratio:mean"] < 10
    grads = [[p.grad for p in tiny_model.adapter_parameters(ex.runs[m].slot)]
             for m in ("custom", "builtin")]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
