"""A run's numbered saves: save_weights (save_state), save_weights_for_sampler (named, or
path-less for a new sampling session) and save_weights_external (an export to download).
The API names each checkpoint's folder now (store/checkpoints.py); the worker writes it and
its task records the row. Called like the verbs of tasks/calls.py: (submitter, tenant, body).
"""

from __future__ import annotations

from typing import Any

from protocol import paths
from protocol.checks import check_seq_id, field
from protocol.errors import RequestError, bad
from store import checkpoints, encryption
from store.schema import ModelRow, RequestRow, SamplerRow
from tasks.submit import Check, Submitter, future, new_request_id, payload


def checkpoint_dir(sub: Submitter, model: ModelRow, segment: str, name: str) -> str:
    root = sub.settings.checkpoint_root
    return str(checkpoints.folder(root, model.tenant, model.id, segment, name))


def _check_new_name(sub: Submitter, model: ModelRow, kind: str, name: str,
                    overwrite: bool) -> None:
    """400 (never 409: the SDK retries 409 for minutes) when the name is taken."""
    if not overwrite and checkpoints.name_taken(sub.store, model.id, kind, name):
        raise bad(f"checkpoint {name!r} already exists for {model.id!r}; "
                  "choose another name or pass overwrite=true")


MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def checkpoint_extras(body: dict[str, Any]) -> dict[str, Any]:
    """What a named checkpoint keeps besides its files: its lifetime and the caller's tags."""
    ttl = field(body, "ttl_seconds", int, None)
    if ttl is not None and not 1 <= ttl <= MAX_TTL_SECONDS:
        raise bad(f"ttl_seconds={ttl} must be between 1 and {MAX_TTL_SECONDS} (10 years); "
                  "omit it: never expires")
    return {"ttl_seconds": ttl, "user_metadata": field(body, "user_metadata", dict, None)}


def save_weights(sub: Submitter, tenant: str, body: dict[str, Any],
                 check: Check | None = None) -> dict[str, Any]:
    """Adapter + optimizer state at tinker://<run>/weights/<path>."""
    model = sub.load_model(tenant, body.get("model_id"))

    def build() -> tuple[bytes, str]:
        name = paths.check_name(body.get("path"))
        _check_new_name(sub, model, "training", name, field(body, "overwrite", bool, False))
        path = paths.checkpoint_path(model.id, "weights", name)
        data = {"checkpoint_dir": checkpoint_dir(sub, model, "weights", name),
                "tinker_path": path, **checkpoint_extras(body)}
        return payload(data), f"path={path}"

    return sub.numbered(model, check_seq_id(body.get("seq_id")), "save_weights", build, check)


def check_kind(body: dict[str, Any], inflight: bool = False) -> str:
    """`snapshot`, or (for a new sampling session) `inflight`: every inflight session of a
    run samples from one folder that each inflight save replaces, so they all move on to
    the newest weights once the worker reloads it."""
    kind = body.get("kind", "snapshot")
    allowed = ("snapshot", "inflight") if inflight else ("snapshot",)
    if kind not in allowed:
        raise bad(f"kind={kind!r} is not supported here (supported: {', '.join(allowed)})")
    return kind


def save_weights_for_sampler(sub: Submitter, tenant: str, body: dict[str, Any],
                             check: Check | None = None) -> dict[str, Any]:
    """The peft adapter at tinker://<run>/sampler_weights/<path>; without a path, for a
    new sampling session (`save_weights_and_get_sampling_client`)."""
    model = sub.load_model(tenant, body.get("model_id"))
    if body.get("path") is None and body.get("sampling_session_seq_id") is not None:
        return save_for_session(sub, model, body, check)

    def build() -> tuple[bytes, str]:
        check_kind(body)
        name = paths.check_name(body.get("path"))
        _check_new_name(sub, model, "sampler", name, False)
        path = paths.checkpoint_path(model.id, "sampler_weights", name)
        data = {
            "checkpoint_dir": checkpoint_dir(sub, model, "sampler_weights", name),
            "tinker_path": path,
            "sampling_session_id": None,
            **checkpoint_extras(body),
        }
        return payload(data), f"path={path}"

    seq = check_seq_id(body.get("seq_id"))
    return sub.numbered(model, seq, "save_weights_for_sampler", build, check)


MAX_AGE_RECIPIENTS = 10


def check_recipients(value: Any) -> list[str] | None:
    """age recipients (native `age1...` keys or SSH public keys), parsed now so that a bad
    one is a 400 naming it rather than a failed save later."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > MAX_AGE_RECIPIENTS:
        raise bad(f"age_encryption_recipients must be a list of 1 to {MAX_AGE_RECIPIENTS} "
                  f"keys, got {str(value)[:80]}")
    for key in value:
        if not isinstance(key, str) or not encryption.is_recipient(key):
            raise bad(f"age_encryption_recipients: {str(key)[:80]!r} is not an age1... key or "
                      "an SSH public key (ssh-ed25519 or ssh-rsa)")
    return value


def save_weights_external(sub: Submitter, tenant: str, body: dict[str, Any],
                          check: Check | None = None) -> dict[str, Any]:
    """The peft adapter at tinker://<run>/external_weights/<path>, for download through
    signed URLs; each file age-encrypted when the caller names recipients."""
    model = sub.load_model(tenant, body.get("model_id"))

    def build() -> tuple[bytes, str]:
        name = paths.check_name(body.get("path"))
        _check_new_name(sub, model, "external", name, False)
        path = paths.checkpoint_path(model.id, "external_weights", name)
        data = {
            "checkpoint_dir": checkpoint_dir(sub, model, "external_weights", name),
            "tinker_path": path,
            "age_recipients": check_recipients(body.get("age_encryption_recipients")),
            **checkpoint_extras(body),
        }
        return payload(data), f"path={path}"

    seq = check_seq_id(body.get("seq_id"))
    return sub.numbered(model, seq, "save_weights_external", build, check)


def save_for_session(sub: Submitter, model: ModelRow, body: dict[str, Any],
                     check: Check | None = None) -> dict[str, Any]:
    """Path-less save: the sampling session is created now, with the folder the save will
    write, so the answer can name it."""
    seq_id = check_seq_id(body.get("seq_id"))
    if found := sub.store.request_holding(model.id, None, seq_id):
        return future(found, model.id)
    n = body.get("sampling_session_seq_id")
    sampler_id = paths.sampler_id(model.session_id, n)  # type: ignore[arg-type]
    row = RequestRow(
        id=new_request_id(),
        tenant=model.tenant,
        kind="save_weights_for_sampler",
        model_id=model.id,
        seq_id=seq_id,
        queue=model.queue,
        summary=f"model={model.id} seq={seq_id} sampler={sampler_id}",
    )
    try:
        if check is not None:
            check()
        check_kind(body, inflight=True)
        if type(n) is not int or n < 0:
            raise bad(f"sampling_session_seq_id={n!r} must be an integer >= 0")
        with sub.store.transaction() as s:
            if s.get(SamplerRow, sampler_id) is not None:
                raise bad(f"sampling session {sampler_id!r} already exists")
    except RequestError as e:
        sub.reject(row, e.message)
    leaf = "inflight" if body.get("kind") == "inflight" else sampler_id
    folder = checkpoint_dir(sub, model, "sampler_weights", f"_session/{leaf}")
    sampler = SamplerRow(
        id=sampler_id,
        tenant=model.tenant,
        session_id=model.session_id,
        base_model=model.base_model,
        model_path=None,
        checkpoint_dir=folder,
        queue=model.queue,
    )
    row.payload = payload(
        {"checkpoint_dir": folder, "tinker_path": None, "sampling_session_id": sampler_id}
    )
    row.summary = f"save_weights_for_sampler {row.summary}"
    return future(sub.submit(row, sampler), model.id)
