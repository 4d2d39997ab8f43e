"""The API's request schemas, one source for two uses: each JSON route's body is checked
against the tinker SDK's own request type for it (the types the SDK serialises, so the wire
format is theirs) before the route's finer checks, and `/openapi.json` is made from the same
types and the app's URL map. The SDK's types forbid fields they do not know; the server's
copies ignore them at the top level instead, so that a newer SDK's added field is no error.

A body that does not fit answers 400 naming the field and what was wrong. Routes the SDK has
no type for have small types of their own here (the tinker CLI's, the OpenAI-compatible
/v1); routes with no JSON body (the console's, the health checks, listings) are listed with
their parameters and answers only; forward_backward's body is protobuf (the SDK's
ForwardBackwardRequest, zstd allowed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flask import Flask
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema
from tinker import types

from protocol.errors import RequestError

# endpoint -> the SDK's type of its JSON body
_SDK: dict[str, type[BaseModel]] = {
    "models.create_model": types.CreateModelRequest,
    "models.get_info": types.GetInfoRequest,
    "models.load_weights": types.LoadWeightsRequest,
    "checkpoints.copy_weights": types.CopyWeightsRequest,
    "client.client_config": types.ClientConfigRequest,
    "client.telemetry": types.TelemetrySendRequest,
    "futures.retrieve_future": types.FutureRetrieveRequest,
    "futures.retrieve_futures": types.FuturesRetrieveRequest,
    "sampling.create_sampling_session": types.CreateSamplingSessionRequest,
    "sampling.join_sampling_session": types.JoinSamplingSessionRequest,
    "sampling.asample": types.SampleRequest,
    "sessions.create_session": types.CreateSessionRequest,
    "sessions.session_heartbeat": types.SessionHeartbeatRequest,
    "training.optim_step": types.OptimStepRequest,
    "training.save_weights": types.SaveWeightsRequest,
    "training.save_weights_for_sampler": types.SaveWeightsForSamplerRequest,
    "training.save_weights_external": types.SaveWeightsExternalRequest,
    "training.create_custom_loss": types.CreateCustomLossRequest,
    "session_views.search_sessions": types.SessionSearchRequest,
    "futures.cancel_future": types.FutureRetrieveRequest,  # the same one field
}


# The routes the SDK has no type for: the tinker CLI's and the OpenAI-compatible API's.
class TtlRequest(BaseModel):
    ttl_seconds: int | None = None  # None: the checkpoint never expires


class ProjectRequest(BaseModel):
    project_id: str


class WeightsInfoRequest(BaseModel):
    tinker_path: str


class _OpenAIRequest(BaseModel):  # what OpenAI's two routes share; each reads what it serves
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    seed: int | None = None
    stop: str | list[str] | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


_OWN: dict[str, type[BaseModel]] = {
    "checkpoints.set_ttl": TtlRequest,
    "session_views.assign_project": ProjectRequest,
    "runs.weights_info": WeightsInfoRequest,
    "openai.completions": CompletionRequest,
    "openai.chat_completions": ChatCompletionRequest,
}


def _tolerant(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with unknown top-level fields ignored rather than refused."""
    config = ConfigDict(**{**model.model_config, "extra": "ignore"})  # type: ignore[typeddict-item]
    return type(model.__name__, (model,), {"model_config": config, "__module__": __name__})


BODIES = {endpoint: _tolerant(model) for endpoint, model in _SDK.items()} | _OWN
PROTOBUF = {"training.forward_backward"}
ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
OPENAI_ERROR = {  # the OpenAI-compatible routes answer errors as OpenAI's API does
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"],
                             "properties": {"message": {"type": "string"},
                                            "type": {"type": "string"},
                                            "code": {"type": "integer"}}}}}


def check_body(endpoint: str | None, data: dict[str, Any]) -> None:
    """Refuse (400) a JSON body that its route's SDK type does not accept."""
    model = BODIES.get(endpoint or "")
    if model is None:
        return
    try:
        model.model_validate(data)
    except ValidationError as e:
        raise RequestError(400, _message(e)) from None


def _message(e: ValidationError) -> str:
    """The first error, at the field it is about: where a value fits none of a union's
    forms, pydantic names each form after the field; the answer names the field."""
    errors = e.errors()
    loc = errors[0]["loc"]
    common = tuple(os.path.commonprefix([err["loc"] for err in errors]))
    if common and common != loc:  # every error under one field: its union's forms
        form = ".".join(str(part) for part in loc[len(common):])
        return f"{'.'.join(str(part) for part in common)}: fits none of its {len(errors)} " \
               f"accepted forms ({form}: {errors[0]['msg']})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{'.'.join(str(part) for part in loc) or 'body'}: {errors[0]['msg']}{more}"


def openapi(app: Flask, needs_key: Callable[[str], bool]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes; `needs_key(path)` says which ask for a key
    (app/auth.py's rule)."""
    keys, defs = models_json_schema([(m, "validation") for m in BODIES.values()],
                                    ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<path:{name}>", f"{{{name}}}").replace(
                f"<{name}>", f"{{{name}}}")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(rule, keys, needs_key)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tinkerq", "version": "0.1.0",
                 "description": "The Tinker API (SDK 0.38.0) served by tinkerq."},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}) | {"Error": ERROR, "OpenAIError": OPENAI_ERROR},
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header",
                                           "name": "X-API-Key"}},
        },
    }


def _operation(rule: Any, keys: dict[Any, Any], needs_key: Callable[[str], bool]
               ) -> dict[str, Any]:
    error = "#/components/schemas/" + ("OpenAIError" if rule.rule.startswith("/v1/") else "Error")
    op: dict[str, Any] = {
        "operationId": rule.endpoint,
        "parameters": [{"name": name, "in": "path", "required": True,
                        "schema": {"type": "string"}} for name in sorted(rule.arguments)],
        "responses": {
            "200": {"description": "The answer."},
            "4XX": {"description": "Refused: the detail says why.",
                    "content": {"application/json": {"schema": {"$ref": error}}}},
            "503": {"description": "A part of the service is away for the moment; retry."},
        },
    }
    if needs_key(rule.rule):
        op["security"] = [{"apiKey": []}]
    if rule.endpoint in BODIES:
        schema = keys[(BODIES[rule.endpoint], "validation")]
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": schema}}}
    elif rule.endpoint in PROTOBUF:
        op["requestBody"] = {"required": True, "content": {"application/x-protobuf": {
            "schema": {"type": "string", "format": "binary"}}}}
    return op
