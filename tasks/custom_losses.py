"""Server-side custom losses at the edge: create_custom_loss checks and stores a graph
(answered at once: its future is a finished row), and a forward_backward with
loss_fn="custom" gets the graph of its loss_id written into its stored body, so the worker
needs nothing but the payload."""

from __future__ import annotations

import json
from typing import Any

from protocol.checks import field
from protocol.custom_graph import check_custom_loss, check_inputs
from protocol.errors import RequestError, bad
from protocol.losses import ProtocolError
from protocol.wire import FwdBwdRequest, set_text_config
from store.schema import DONE, CustomLossRow, ModelRow, RequestRow, utcnow
from tasks.submit import Submitter, future, new_request_id


def create(sub: Submitter, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
    n = field(body, "custom_loss_seq_id", int)
    if n < 0:
        raise bad(f"custom_loss_seq_id={n} must be >= 0")
    with sub.store.transaction() as s:
        session = sub.open_session(s, tenant, body.get("session_id"))
        loss_id = f"{session.id}:loss:{n}"
        if (old := s.get(CustomLossRow, loss_id)) is not None:  # a retried creation
            return future(old.request_id)
        spec = check_custom_loss(body)
        answer = {"loss_id": loss_id, "type": "create_custom_loss"}
        row = RequestRow(id=new_request_id(), tenant=tenant, kind="create_custom_loss",
                         queue="", payload=b"", state=DONE, result=json.dumps(answer).encode(),
                         result_type="json", finished_at=utcnow(),
                         summary=f"create_custom_loss {loss_id} {spec['name']}"[:256])
        s.add(row)
        s.add(CustomLossRow(id=loss_id, tenant=tenant, session_id=session.id,
                            name=spec["name"], spec=spec, request_id=row.id))
    return future(row.id)


def resolve(sub: Submitter, model: ModelRow, req: FwdBwdRequest, body: bytes) -> bytes:
    """The stored body of a custom-loss call: its graph in the config, its data checked."""
    loss_id = req.loss_fn_config.get("loss_id")
    if not isinstance(loss_id, str):
        raise bad("loss_fn 'custom' needs loss_fn_config['loss_id'] (create_custom_loss)")
    with sub.store.transaction() as s:
        row = s.get(CustomLossRow, loss_id)
        if row is None or row.tenant != model.tenant:
            raise RequestError(404, f"custom loss {loss_id!r} not found")
        if row.session_id != model.session_id:
            raise bad(f"custom loss {loss_id!r} belongs to session {row.session_id}; only "
                      "that session's training runs can use it")
        spec = row.spec
    try:
        for i, datum in enumerate(req.data):
            check_inputs(spec, i, len(datum.tokens), datum.inputs)
    except ProtocolError as e:
        raise bad(str(e)) from e
    req.loss_fn_config = {"custom_loss": json.dumps(spec)}
    return set_text_config(body, {"custom_loss": json.dumps(spec)})
