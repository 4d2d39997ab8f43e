"""What crosses between a Celery task and the engine: `Job` in, `Outcome` out.

Plain Python (no torch), so the scheduler and the tests can use it anywhere. The API writes
each request's `payload` already validated and resolved (paths to folders, LoRA configs);
the engine trusts the resolution, and re-checks only what would break a shared batch for
everyone (token ids, loss inputs) so that one bad job fails alone. A payload is decoded once,
when the task makes its `Job`: the scheduler, the executor and every tensor-parallel rank
that the plan is sent to use that `body`. Payloads per kind, all JSON except
forward_backward:

    create_model      {"model_id", "base_model", "lora": {"rank", "seed"|None, "train_attn",
                       "train_mlp", "train_unembed"}}
                      -> {"model_id", "type": "create_model"}
    load_weights      {"model_id", "create": bool, "checkpoint_dir", "optimizer": bool,
                       "tinker_path", "base_model", "lora": {...as above, from the checkpoint}}
                      -> {"path", "model_id", "type": "load_weights"}
    forward_backward  the raw protobuf `tinker_public.ForwardBackwardRequest` body
    (also "forward":  forward_only=true in the same message)
                      -> protobuf ForwardBackwardOutput
    optim_step        {"adam_params": {"learning_rate", "beta1", "beta2", "eps",
                       "weight_decay", "grad_clip_norm"}}
                      -> {"metrics": {...}, "type": "optim_step"}
    save_weights      {"checkpoint_dir", "tinker_path", "ttl_seconds"|None, "user_metadata"|None}
                      -> {"path", "type": "save_weights"}
    save_weights_for_sampler
                      {"checkpoint_dir", "tinker_path"|None, "sampling_session_id"|None,
                       "ttl_seconds"|None, "user_metadata"|None}
                      -> {"path", "sampling_session_id", "type": "save_weights_for_sampler"}
    save_weights_external
                      {"checkpoint_dir", "tinker_path", "age_recipients": [str]|None,
                       "ttl_seconds"|None, "user_metadata"|None}
                      -> {"path", "size_bytes", "type": "save_weights_external"}
    sample            {"prompt": [int], "num_samples", "max_tokens", "temperature", "top_k",
                       "top_p", "seed"|None, "stop_strings": [str], "stop_token_ids": [int],
                       "stop_at_eos": bool, "prompt_logprobs": bool,
                       "topk_prompt_logprobs": int, "topk_sample_logprobs": int,
                       "prompt_logprobs_last_n": int|None,
                       "prompt_alt_tokens_k": int, "target_prompt": {"ids": [[int]] (-1: none),
                       "layout": {"crow", "col"}|None}|None,
                       "adapter_dir": str|None (None = base)}
                      -> protobuf SampleResponse
    skip              {} : a seq_id the API already answered (rejected input, or a retried
                      task whose row is finished); it only advances the model's order.
    restore_model     made by a worker, never stored: {"model_id", "base_model",
                       "snapshot_dir", "snapshot_seq", "next_seq"}, and `body["replay"]`, the
                       done calls after the snapshot as Jobs in seq_id order (tasks/recovery.py)
                      -> {"model_id", "replayed", "type": "restore_model"}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

# Kinds that change or checkpoint a model's state: a batch of forward/backward calls of a
# model never runs past one of these.
BARRIER_KINDS = frozenset(
    {"create_model", "load_weights", "optim_step", "save_weights", "save_weights_for_sampler",
     "save_weights_external"}
)
# Kinds that bring a model into being (their seq_id is None: they precede seq_id 1).
CREATION_KINDS = frozenset({"create_model", "load_weights"})
TRAIN_KINDS = frozenset({"forward", "forward_backward"})
SAMPLE_KINDS = frozenset({"sample"})
ALL_KINDS = BARRIER_KINDS | TRAIN_KINDS | SAMPLE_KINDS | {"skip"}  # a request row's kinds
# A run rebuilt by a worker that did not hold it (its snapshot, then the calls after it):
# like a creation, it opens the model, at the seq_id after the last call it replayed.
RESTORE = "restore_model"
OPENING_KINDS = CREATION_KINDS | {RESTORE}
# The done calls that change a run's state, which a restore runs again.
REPLAYED_KINDS = frozenset({"forward_backward", "optim_step", "load_weights"})


@dataclass
class Job:
    """One request handed to the engine, its payload decoded once (`decode_payload`) when
    the job is made: what the scheduler, the executor and every tensor-parallel rank use."""

    request_id: str
    kind: str
    payload: InitVar[bytes]  # as stored in the request row; only `body` is kept
    model_id: str | None = None  # training calls: the model whose seq_id order applies
    seq_id: int | None = None  # None for create/load-by-creation and for samples
    sampler_id: str | None = None
    enqueued_at: float = 0.0  # time.monotonic() when the engine received it
    body: Any = field(init=False, repr=False)  # FwdBwdRequest, or the JSON object
    invalid: str | None = field(init=False, default=None)  # why the payload did not decode

    def __post_init__(self, payload: bytes) -> None:
        if self.kind not in ALL_KINDS | {RESTORE}:
            raise ValueError(f"unknown job kind {self.kind!r}; known: {sorted(ALL_KINDS)}")
        try:
            self.body = decode_payload(self.kind, payload)
        except ValueError as e:  # the executor fails the job alone, with this message
            self.body, self.invalid = None, str(e)

    @property
    def num_tokens(self) -> int:
        """The job's share of a tick's token budget (0 when it has none or is invalid)."""
        if self.invalid is not None:
            return 0
        if self.kind in TRAIN_KINDS:
            return self.body.num_tokens
        if self.kind in SAMPLE_KINDS:
            body = self.body
            return len(body["prompt"]) + body["num_samples"] * body["max_tokens"]
        return 0


def decode_payload(kind: str, payload: bytes) -> Any:
    """A stored payload as the engine uses it: a `FwdBwdRequest` for forward and
    forward_backward (the protobuf body), the JSON object for every other kind.
    Raises ValueError (WireError, JSONDecodeError) for a payload that does not decode."""
    if kind in TRAIN_KINDS:
        # here, not at the top: the SDK's protobuf module imports torch where it is
        # installed, and the scheduler, which imports this module, loads no torch
        from protocol.wire import decode_forward_backward

        return decode_forward_backward(payload)
    if kind == "skip":  # only advances an order: whatever its row held is not read
        return {}
    try:
        body = json.loads(payload) if payload else {}
    except ValueError as e:
        raise ValueError(f"{kind} payload is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError(f"{kind} payload must be a JSON object, got {type(body).__name__}")
    return body


Category = Literal["user", "server", "unknown"]


@dataclass
class Outcome:
    """The answer to one job: a JSON object, protobuf bytes, or an error.

    `checkpoint` (optional) describes a checkpoint the job wrote, for the task to record:
    {"model_id", "kind": "training"|"sampler"|"external", "name", "tinker_path", "local_dir",
     "size_bytes", "ttl_seconds", "user_metadata"}.
    """

    json: dict[str, Any] | None = None
    proto: bytes | None = None
    error: str | None = None
    category: Category = "server"
    compute_seconds: float = 0.0
    checkpoint: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def fail(cls, message: str, category: Category = "user") -> Outcome:
        return cls(error=message, category=category)

    def replace(self, **changes: Any) -> Outcome:
        return dataclasses.replace(self, **changes)


class UserError(ValueError):
    """Bad input discovered inside the engine: becomes an Outcome with category `user`."""
