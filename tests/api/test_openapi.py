"""/openapi.json is made from the schemas that check the bodies (app/schemas.py): every route
is in it, a JSON route's body schema is its checking model's, and a body the schema refuses
is a 400 naming the field. (Schemathesis fuzzes the spec against the live stack:
tests/e2e/test_operations.py.)"""

from __future__ import annotations

import json

from app import schemas


def test_every_route_is_in_the_spec_with_its_body_schema(app):
    spec = app.test_client().get("/openapi.json").get_json()
    assert set(schemas.BODIES) | schemas.PROTOBUF <= set(app.view_functions)
    assert spec["openapi"].startswith("3.")
    routes = {rule.rule for rule in app.url_map.iter_rules()} - {"/openapi.json"}
    assert len(spec["paths"]) == len({r for r in routes if not r.startswith("/static")})
    session = spec["paths"]["/api/v1/create_session"]["post"]
    body = session["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    model = schemas.BODIES["sessions.create_session"]
    assert set(spec["components"]["schemas"][name]["required"]) == {
        n for n, f in model.model_fields.items() if f.is_required()} >= {"sdk_version"}
    assert session["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    fb = spec["paths"]["/api/v1/forward_backward"]["post"]["requestBody"]
    assert list(fb["content"]) == ["application/x-protobuf"]
    v1 = spec["paths"]["/v1/completions"]["post"]["responses"]["4XX"]
    assert v1["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")


def test_a_body_the_schema_refuses_is_a_400_naming_the_field(api):
    resp = api.post("create_session", {"tags": [], "user_metadata": {}})
    assert resp.status_code == 400 and resp.get_json()["detail"].startswith("sdk_version:")
    resp = api.post("create_session", {"tags": "x", "user_metadata": {}, "sdk_version": "1"})
    assert resp.status_code == 400 and "tags" in resp.get_json()["detail"]
    # a field the SDK does not know (a newer SDK's) is no error
    resp = api.post("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "9",
                                       "type": "create_session", "added_later": 1})
    assert resp.status_code == 200, resp.get_json()


def test_the_openai_routes_refuse_in_openai_s_shape(app):
    client = app.test_client()
    resp = client.post("/v1/completions", json={"model": "x", "prompt": 5},
                       headers={"Authorization": "Bearer tml-openapi-test"})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["message"].startswith("prompt:")


def test_optim_params_is_read_as_the_sdk_s_type_reads_it(api, model_id, enqueued):
    """The spec names the field optim_params (its type's first name for it); the SDK sends
    adam_params. Either is the step's AdamW parameters, not a default."""
    adam = {"learning_rate": 0.5, "beta1": 0.8, "beta2": 0.9, "eps": 1e-6,
            "weight_decay": 0.0, "grad_clip_norm": 0.0}
    api.ok("optim_step", {"model_id": model_id, "seq_id": 2, "optim_params": adam})
    [row] = enqueued
    assert json.loads(row.payload) == {"adam_params": adam}
