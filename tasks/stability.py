"""Recorded samples for stable_reinforce: kept by the API, looked up when a run trains on them.

A sample call made with `record_stability_info=True` is recorded: its request row (prompt in
the payload, sampled tokens and the sampler's log-probs in the stored result) stays usable
until `stability_expires_at`, a day after sampling. Its sequence ids are
"{request_id}:{index}" (`tasks.calls.sample`). A forward_backward with `stable_reinforce` names
them through provenance spans; `resolve` checks that each belongs to the run's own session
and tenant, is recorded, answered and not expired, pushes its expiry a day on (each use
restarts the day, as the Tinker docs say), checks the datum's tokens against the record
(`protocol.provenance`) and writes the recorded log-probs into the body that is stored.
"""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import select

from protocol import provenance
from protocol.errors import bad
from protocol.losses import ProtocolError
from protocol.wire import FwdBwdRequest, decode_sample_sequences, replace_loss_inputs
from store.schema import DONE, ModelRow, RequestRow, SamplerRow, utcnow
from tasks.submit import Submitter

RECORD_LIFETIME = dt.timedelta(days=1)


def expiry() -> dt.datetime:
    return utcnow() + RECORD_LIFETIME


def resolve(sub: Submitter, model: ModelRow, req: FwdBwdRequest, body: bytes) -> bytes:
    """The body to store: `req`'s data with the recorded log-probs and sampled mask (also
    set on `req.data`, for the checks that follow). Raises a 400 naming a bad id or span."""
    ids = sorted(provenance.sequence_ids(req.data))
    recorded = _recorded(sub, model, ids)
    try:
        replaced = provenance.resolve(req.data, recorded)
    except ProtocolError as e:
        raise bad(str(e)) from e
    for datum, inputs in zip(req.data, replaced, strict=True):
        datum.inputs.update(inputs)
    return replace_loss_inputs(body, replaced)


def _recorded(sub: Submitter, model: ModelRow, ids: list[str]) -> dict[str, provenance.Recorded]:
    by_request: dict[str, list[tuple[str, int]]] = {}
    for sequence_id in ids:
        request_id, _, index = sequence_id.rpartition(":")
        if not request_id or not index.isdigit():
            raise bad(f"sequence_id {sequence_id!r} is not one this server gave out")
        by_request.setdefault(request_id, []).append((sequence_id, int(index)))
    now, out = utcnow(), {}
    with sub.store.transaction() as s:
        rows = s.execute(
            select(RequestRow, SamplerRow.session_id)
            .join(SamplerRow, SamplerRow.id == RequestRow.sampler_id)
            .where(RequestRow.id.in_(list(by_request)), RequestRow.kind == "sample",
                   RequestRow.tenant == model.tenant)
        ).all()
        found = {row.id: (row, session) for row, session in rows}
        for request_id, named in by_request.items():
            first = named[0][0]
            if request_id not in found or found[request_id][1] != model.session_id:
                raise bad(f"sequence_id {first!r} is unknown in session {model.session_id!r}: "
                          "stable_reinforce trains on sequences its own session sampled")
            row = found[request_id][0]
            if row.stability_expires_at is None:
                raise bad(f"sequence_id {first!r} was sampled without "
                          "record_stability_info=True, so nothing was recorded for it")
            if row.stability_expires_at < now:
                when = row.stability_expires_at.strftime("%Y-%m-%d %H:%M:%S")
                raise bad(f"sequence_id {first!r} expired at {when} UTC (a day after its "
                          "last use)")
            if row.state != DONE or row.result is None:
                raise bad(f"sequence_id {first!r} has no sampled tokens: its sample call "
                          f"is {row.state}")
            prompt = json.loads(row.payload)["prompt"]
            sequences = decode_sample_sequences(row.result)
            for sequence_id, index in named:
                if index >= len(sequences):
                    raise bad(f"sequence_id {sequence_id!r} names sample {index}, but its call "
                              f"returned {len(sequences)}")
                seq = sequences[index]
                out[sequence_id] = provenance.Recorded(prompt, seq.tokens, seq.logprobs)
            row.stability_expires_at = now + RECORD_LIFETIME
    return out
