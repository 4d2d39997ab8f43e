"""Every Tinker call that writes a request row, as a function of (submitter, tenant, body):
the body is what the SDK sends, a JSON object (or the protobuf bytes of forward_backward),
and the answer is the future REST returns. The REST blueprints and batch scripts
(`tasks.batch`) both call these, through one `Submitter` each (tasks/submit.py). The saves
of a run's checkpoints are in tasks/saves.py.

Run ids are "{session_id}:train:{model_seq_id}" (the SDK derives exactly this id on the
create-via-load path), sampler ids "{session_id}:sample:{n}" (protocol/paths.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError

from protocol import paths
from protocol.checks import (
    check_adam,
    check_forward_backward,
    check_lora,
    check_optimizer_config,
    check_sample,
    check_seq_id,
    field,
    text_only,
)
from protocol.errors import RequestError, bad
from protocol.losses import CUSTOM, PROVENANCE_LOSSES
from protocol.wire import TextOnlyError, WireError, decode_forward_backward
from store import usage
from store.schema import CheckpointRow, ModelRow, RequestRow, SamplerRow
from store.sessions import owner_urn
from tasks import custom_losses, placement, stability
from tasks.saves import checkpoint_dir
from tasks.submit import Check, Submitter, future, new_request_id, payload

# --- creations ------------------------------------------------------------------------------


def new_model_id(sub: Submitter, tenant: str, body: dict[str, Any]) -> str:
    """ "{session}:train:{model_seq_id}" for a session of the caller's."""
    with sub.store.transaction() as s:
        session = sub.open_session(s, tenant, body.get("session_id"))
    seq = field(body, "model_seq_id", int)
    if seq < 0:
        raise bad(f"model_seq_id={seq} must be >= 0")
    return paths.model_id(session.id, seq)


def create_model(sub: Submitter, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
    model_id = new_model_id(sub, tenant, body)
    if found := sub.store.request_holding(model_id, None, 0):
        return future(found, model_id)
    base = field(body, "base_model", str)
    queue = placement.queue_for(sub, base, training=True)  # (400 if no worker serves it)
    lora = check_lora(field(body, "lora_config", dict, {}), sub.settings)
    check_optimizer_config(body.get("optimizer_config"))
    model = ModelRow(
        id=model_id,
        tenant=tenant,
        session_id=model_id.split(":")[0],
        base_model=base,
        lora_rank=lora["rank"],
        lora_seed=lora["seed"],
        train_attn=lora["train_attn"],
        train_mlp=lora["train_mlp"],
        train_unembed=lora["train_unembed"],
        user_metadata=field(body, "user_metadata", dict, {}),
        queue=queue,
    )
    data = {"model_id": model_id, "base_model": base, "lora": lora}
    return sub.creation(model, "create_model", data)


def lora_of(model: ModelRow) -> dict[str, Any]:
    return {
        "rank": model.lora_rank,
        "seed": model.lora_seed,
        "train_attn": model.train_attn,
        "train_mlp": model.train_mlp,
        "train_unembed": model.train_unembed,
    }


def weights_source(sub: Submitter, tenant: str, body: dict[str, Any]
                   ) -> tuple[CheckpointRow, ModelRow]:
    """The `weights` checkpoint at the body's `path` (the caller's, a published one, or one
    its `weights_access_token` may read) and the run that saved it."""
    path = body.get("path")
    _, kind, _ = paths.parse_tinker_path(path)
    if kind != "training":
        raise bad(
            f"load_weights needs a weights checkpoint "
            f"(tinker://<run>/weights/<name>), got {path!r}"
        )
    with sub.store.transaction() as s:
        ckpt = sub.checkpoint(s, tenant, path, read=True,
                              access_token=body.get("weights_access_token"))
        usage.audit(s, ckpt.tenant, "checkpoint_read", purpose="load", model_id=ckpt.model_id,
                    tinker_path=path, actor=owner_urn(tenant))
        source = s.get(ModelRow, ckpt.model_id)
        if source is None:
            raise RequestError(404, f"the training run of {path!r} no longer exists")
    return ckpt, source


def load_data(model_id: str, create: bool, body: dict[str, Any], ckpt: CheckpointRow,
              source: ModelRow) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "create": create,
        "checkpoint_dir": ckpt.local_dir,
        "optimizer": field(body, "optimizer", bool, False),
        "tinker_path": ckpt.tinker_path,
        "base_model": source.base_model,
        "lora": lora_of(source),
    }


def load_weights(sub: Submitter, tenant: str, body: dict[str, Any],
                 check: Check | None = None) -> dict[str, Any]:
    """A new run from a weights checkpoint; with `model_id`, the legacy load into a run.
    `check`: the body's schema check, run by a numbered load so that its 400 claims the
    seq_id; a new run is checked before."""
    if body.get("model_id") is not None:
        return load_into(sub, tenant, body, check)
    if check is not None:
        check()
    model_id = new_model_id(sub, tenant, body)
    if found := sub.store.request_holding(model_id, None, 0):
        return future(found, model_id)
    ckpt, source = weights_source(sub, tenant, body)
    if body.get("base_model") is not None:
        placement.queue_for(sub, field(body, "base_model", str), training=True)  # served?
    check_optimizer_config(body.get("optimizer_config"))
    metadata = field(body, "user_metadata", dict, None)
    model = ModelRow(
        id=model_id,
        tenant=tenant,
        session_id=model_id.split(":")[0],
        base_model=source.base_model,
        lora_rank=source.lora_rank,
        lora_seed=source.lora_seed,
        train_attn=source.train_attn,
        train_mlp=source.train_mlp,
        train_unembed=source.train_unembed,
        queue=placement.queue_for(sub, source.base_model, training=True),
        user_metadata=dict(source.user_metadata) if metadata is None else metadata,
    )
    return sub.creation(model, "load_weights", load_data(model_id, True, body, ckpt, source))


def load_into(sub: Submitter, tenant: str, body: dict[str, Any],
              check: Check | None = None) -> dict[str, Any]:
    """Legacy form (deprecated `TrainingClient.load_state`): an existing model, a seq_id."""
    model = sub.load_model(tenant, body.get("model_id"))
    seq = check_seq_id(body.get("seq_id"))

    def build() -> tuple[bytes, str]:
        ckpt, source = weights_source(sub, tenant, body)
        if source.lora_rank != model.lora_rank:
            raise bad(
                f"checkpoint {ckpt.tinker_path!r} has LoRA rank "
                f"{source.lora_rank}; model {model.id!r} has {model.lora_rank}"
            )
        data = load_data(model.id, False, body, ckpt, source)
        return payload(data), f"from={ckpt.tinker_path}"

    return sub.numbered(model, seq, "load_weights", build, check)


# --- a run's numbered calls -----------------------------------------------------------------


def forward_backward(sub: Submitter, tenant: str, body: bytes) -> dict[str, Any]:
    """forward_backward, or forward (`forward_only`): the body is stored as it came."""
    try:
        req = decode_forward_backward(body)
    except TextOnlyError as e:
        raise bad(f"{e}; {text_only(sub.settings)}") from e
    except (WireError, ValueError) as e:
        raise bad(str(e)) from e
    model = sub.load_model(tenant, req.model_id)
    kind = "forward" if req.forward_only else "forward_backward"

    def build() -> tuple[bytes, str]:
        stored = body
        if req.loss_fn in PROVENANCE_LOSSES:  # the record's sampler log-probs go in
            stored = stability.resolve(sub, model, req, body)
        if req.loss_fn == CUSTOM:  # the loss's graph goes in
            stored = custom_losses.resolve(sub, model, req, body)
        check_forward_backward(req, sub.settings,
                               placement.model_info(sub, model.base_model).vocab_size)
        return stored, f"loss={req.loss_fn} datums={len(req.data)} tokens={req.num_tokens}"

    return sub.numbered(model, check_seq_id(req.seq_id), kind, build)


def optim_step(sub: Submitter, tenant: str, body: dict[str, Any],
               check: Check | None = None) -> dict[str, Any]:
    model = sub.load_model(tenant, body.get("model_id"))

    def build() -> tuple[bytes, str]:
        if body.get("optimizer_params") is not None:
            raise bad("optimizer_params is not supported: this server trains with AdamW "
                      "(adam_params)")
        # the SDK sends adam_params; its type reads optim_params as the same field
        key = "optim_params" if "optim_params" in body and "adam_params" not in body \
            else "adam_params"
        adam = check_adam(field(body, key, dict, {}))
        return payload({"adam_params": adam}), f"lr={adam['learning_rate']:g}"

    return sub.numbered(model, check_seq_id(body.get("seq_id")), "optim_step", build, check)


# --- sampling -------------------------------------------------------------------------------


def create_sampler(sub: Submitter, tenant: str, body: dict[str, Any],
                   planned: bool = False) -> SamplerRow:
    """A sampling session on the base model or on a checkpoint's adapter (sampler weights,
    or a training checkpoint's; the caller's or a published one); a retried creation
    answers the first. `planned`: the weights may be a save that a batch's chain makes
    later, so they need not exist yet (their run must be the caller's)."""
    try:
        return _new_sampler(sub, tenant, body, planned)
    except IntegrityError:  # an identical creation won the race
        return _new_sampler(sub, tenant, body, planned)


def _new_sampler(sub: Submitter, tenant: str, body: dict[str, Any], planned: bool
                 ) -> SamplerRow:
    with sub.store.transaction() as s:
        session = sub.open_session(s, tenant, body.get("session_id"))
        n = field(body, "sampling_session_seq_id", int)
        if n < 0:
            raise bad(f"sampling_session_seq_id={n} must be >= 0")
        sampler_id = paths.sampler_id(session.id, n)
        if (old := s.get(SamplerRow, sampler_id)) is not None:
            return old  # a retried creation
        sampler = SamplerRow(id=sampler_id, tenant=tenant, session_id=session.id,
                             queue=sub.settings.queue, base_model="", model_path=None)
        if (path := body.get("model_path")) is not None:
            run_id, kind, name = paths.parse_tinker_path(path)
            if kind == "external":
                raise bad(f"model_path {path!r} is an export for download; sample from a "
                          "sampler_weights or weights checkpoint")
            if planned:
                source = sub.owned(s, tenant, ModelRow, run_id, "training run")
                folder = checkpoint_dir(sub, source, paths.SEGMENT_OF[kind], name)
            else:  # both kinds hold the peft adapter files the sampler reads
                ckpt = sub.checkpoint(s, tenant, path, read=True)
                usage.audit(s, ckpt.tenant, "checkpoint_read", purpose="sample",
                            model_id=ckpt.model_id, tinker_path=path,
                            actor=owner_urn(tenant))
                source = sub.owned(s, ckpt.tenant, ModelRow, ckpt.model_id, "training run")
                folder = ckpt.local_dir
            sampler.base_model, sampler.model_path = source.base_model, path
            sampler.checkpoint_dir = folder
        else:
            sampler.base_model = field(body, "base_model", str)
        sampler.queue = placement.queue_for(sub, sampler.base_model, training=False)
        s.add(sampler)
    return sampler


def sample(sub: Submitter, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
    sampler = sub.load_sampler(tenant, body.get("sampling_session_id"))
    seq_id = field(body, "seq_id", int)
    info = placement.model_info(sub, sampler.base_model)
    data = check_sample(body, sub.settings, info.vocab_size, info.max_position_embeddings)
    data["adapter_dir"] = sampler.checkpoint_dir
    record = field(body, "record_stability_info", bool, False)
    row = RequestRow(
        id=new_request_id(),
        tenant=sampler.tenant,
        kind="sample",
        sampler_id=sampler.id,
        seq_id=seq_id,
        queue=sampler.queue,
        payload=payload(data),
        summary=(
            f"sample sampler={sampler.id} seq={seq_id} n={data['num_samples']} "
            f"prompt={len(data['prompt'])} max_tokens={data['max_tokens']}"
        )[:256],
        stability_expires_at=stability.expiry() if record else None,
    )
    request_id = sub.submit(row)
    ids = [f"{request_id}:{j}" for j in range(data["num_samples"])]
    return future(request_id, sample_sequence_ids=ids)
