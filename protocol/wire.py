"""Protobuf codecs for the three binary messages of the Tinker wire protocol.

The message types are the `tinker` SDK's own (`tinker.proto.tinker_public_pb2`), never a
copy. NumPy only (no torch): the API decodes to validate, the worker decodes to compute and
encodes the results.

  decode_forward_backward(body)          -> FwdBwdRequest
  replace_loss_inputs(body, inputs)      -> bytes (the same request, some inputs replaced)
  encode_forward_backward_output(...)    -> bytes (ForwardBackwardOutput)
  encode_sample_response(...)            -> bytes (SampleResponse)
  decode_sample_sequences(result)        -> [WireSequence]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

_DTYPES: dict[int, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}


@dataclass(frozen=True)
class Span:
    """A provenance run (`Datum.with_provenance`): the datum's next `length` positions are
    positions [offset, offset + length) of a recorded sequence's prompt or sampled tokens."""

    sampled: bool  # SampledProvenanceSpan (else PromptProvenanceSpan)
    sequence_id: str
    offset: int
    length: int


@dataclass
class WireDatum:
    tokens: np.ndarray  # int64 [N], the model input (text chunks concatenated)
    inputs: dict[str, np.ndarray]  # loss_fn_inputs by name, 1-D arrays
    input_spans: list[Span] | None = None  # provenance of `tokens`
    target_spans: list[Span] | None = None  # provenance of inputs["target_tokens"]


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    data: list[WireDatum] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(d.tokens) for d in self.data)


__all__ = ["FwdBwdRequest", "Span", "TextOnlyError", "WireDatum", "WireError",
           "decode_forward_backward", "decode_sample_sequences",
           "encode_forward_backward_output", "encode_sample_response", "replace_loss_inputs"]


MAX_DENSE_ELEMENTS = 1 << 27  # a sparse loss input made dense: 512 MiB of float32 at most


class WireError(ValueError):
    """A body that does not decode, or decodes to something malformed."""


class TextOnlyError(WireError):
    """An image or audio chunk: the served models take text only (the caller names them)."""


def _tensor(msg: pb.Tensor, name: str) -> np.ndarray:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}] has unsupported dtype {msg.dtype}")
    shape = list(msg.shape)
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype="<i8")
        col = np.frombuffer(csr.col_indices, dtype="<i8")
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise WireError(f"loss_fn_inputs[{name!r}] is a malformed sparse CSR tensor")
        if shape[0] * shape[1] > MAX_DENSE_ELEMENTS:
            raise WireError(f"loss_fn_inputs[{name!r}] has shape {shape}: more than "
                            f"{MAX_DENSE_ELEMENTS} elements once dense")
        if len(col) and not (col.min() >= 0 and col.max() < shape[1]):
            raise WireError(f"loss_fn_inputs[{name!r}] has column indices outside "
                            f"[0, {shape[1]})")
        if crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0):
            raise WireError(f"loss_fn_inputs[{name!r}] has row offsets that are not "
                            f"non-decreasing from 0 to {len(values)}")
        dense = np.zeros(shape, dtype=dtype)
        for r in range(shape[0]):
            lo, hi = int(crow[r]), int(crow[r + 1])
            dense[r, col[lo:hi]] = values[lo:hi]
        return dense
    if len(msg.dense) % dtype.itemsize:
        raise WireError(f"loss_fn_inputs[{name!r}] byte length is not a multiple of its dtype")
    arr = np.frombuffer(msg.dense, dtype=dtype)
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise WireError(f"loss_fn_inputs[{name!r}] has {arr.size} values for shape {shape}")
        arr = arr.reshape(shape)
    return arr


def _tokens(datum: pb.Datum, index: int) -> np.ndarray:
    parts = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise TextOnlyError(f"data[{index}] has a {kind!r} chunk")
        parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _spans(spans: Any) -> list[Span] | None:
    out = []
    for span in spans:
        arm = span.WhichOneof("span")
        if arm is None:
            raise WireError("a provenance span names neither prompt_tokens nor sampled_tokens")
        run = getattr(span, arm)
        out.append(Span(arm == "sampled_tokens", run.sequence_id, run.offset, run.length))
    return out or None


def _parse(body: bytes) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise WireError(f"body is not a ForwardBackwardRequest protobuf: {e}") from e
    return msg


def decode_forward_backward(body: bytes) -> FwdBwdRequest:
    msg = _parse(body)
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 carries strings too; it wins when set
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    data = [
        WireDatum(
            tokens=_tokens(d, i),
            inputs={name: _tensor(t, name) for name, t in d.loss_fn_inputs.items()},
            input_spans=_spans(d.model_input_spans),
            target_spans=_spans(d.loss_fn_input_spans),
        )
        for i, d in enumerate(msg.data)
    ]
    return FwdBwdRequest(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=msg.forward_only,
        data=data,
    )


def set_text_config(body: bytes, config: dict[str, str]) -> bytes:
    """The request `body` with its loss_fn_config replaced by these text values."""
    msg = _parse(body)
    msg.loss_fn_config.clear()
    msg.loss_fn_config_v2.clear()
    for key, value in config.items():
        msg.loss_fn_config_v2[key].text = value
    return msg.SerializeToString()


def replace_loss_inputs(body: bytes, inputs: list[dict[str, np.ndarray]]) -> bytes:
    """The request `body` with datum i's loss_fn_inputs named in inputs[i] set (dense
    float32, 1-D) and everything else as it came."""
    msg = _parse(body)
    for datum, replaced in zip(msg.data, inputs, strict=True):
        for name, arr in replaced.items():
            values = np.ascontiguousarray(arr, dtype="<f4")
            datum.loss_fn_inputs[name].CopyFrom(pb.Tensor(
                dense=values.tobytes(), dtype=pb.DTYPE_FLOAT32, shape=list(values.shape)))
    return msg.SerializeToString()


def _batched(arrays: list[np.ndarray], dtype: pb.DType.ValueType) -> pb.BatchedTensor:
    np_dtype = _DTYPES[dtype]
    blobs = [np.ascontiguousarray(a, dtype=np_dtype).tobytes() for a in arrays]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    return pb.BatchedTensor(data=b"".join(blobs), offsets=offsets.astype("<i8").tobytes(),
                            dtype=dtype)


def encode_forward_backward_output(
    outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]
) -> bytes:
    """Every datum's float32 fields (e.g. logprobs, elementwise_loss) as ArrayRecords, in
    datum order: one record per run of datums whose fields have the same trailing shape
    (logprobs are [N] for 1-D targets, [N, K] for top-k ones), since a record's field has
    one `trailing_shape`."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=metrics)
    runs: list[list[dict[str, np.ndarray]]] = []
    for out in outputs:
        key = [np.shape(v)[1:] for v in out.values()]
        if runs and [np.shape(v)[1:] for v in runs[-1][0].values()] == key:
            runs[-1].append(out)
        else:
            runs.append([out])
    if not runs:
        msg.loss_fn_outputs.append(pb.ArrayRecord(type_tag="ArrayRecord", num_datums=0))
    for run in runs:
        record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(run))
        for name, first in run[0].items():
            batched = _batched([o[name] for o in run], pb.DTYPE_FLOAT32)
            batched.trailing_shape.extend(np.shape(first)[1:])
            record.fields[name].CopyFrom(batched)
        msg.loss_fn_outputs.append(record)
    return msg.SerializeToString()


@dataclass
class WireSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk: tuple[np.ndarray, np.ndarray] | None = None  # ids [n, k], logprobs [n, k]


def _out_tensor(values: np.ndarray, layout: dict | None) -> pb.Tensor:
    """A 2-D answer tensor, dense or in the request's sparse CSR layout."""
    dtype, code = ("<i8", pb.DTYPE_INT64) if values.dtype.kind == "i" else ("<f4",
                                                                            pb.DTYPE_FLOAT32)
    msg = pb.Tensor(dtype=code, shape=list(values.shape))
    if layout is None:
        msg.dense = np.ascontiguousarray(values, dtype=dtype).tobytes()
        return msg
    crow, col = np.asarray(layout["crow"], "<i8"), np.asarray(layout["col"], "<i8")
    rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    msg.sparse_csr.crow_indices = crow.tobytes()
    msg.sparse_csr.col_indices = col.tobytes()
    msg.sparse_csr.values = np.ascontiguousarray(values[rows, col], dtype=dtype).tobytes()
    return msg


def _topk(ids: np.ndarray, logprobs: np.ndarray) -> pb.TopkLogprobs:
    n, k = ids.shape
    return pb.TopkLogprobs(
        token_ids=np.ascontiguousarray(ids, dtype="<i4").tobytes(),
        logprobs=np.ascontiguousarray(logprobs, dtype="<f4").tobytes(),
        k=k,
        length=n,
    )


def encode_sample_response(
    sequences: list[WireSequence],
    prompt_logprobs: list[float] | None = None,
    topk_prompt: tuple[np.ndarray, np.ndarray] | None = None,
    target: tuple[np.ndarray, dict | None] | None = None,
    alt: tuple[np.ndarray, np.ndarray] | None = None,
    cache_hit_tokens: int = 0,
) -> bytes:
    """`topk_prompt` = (token_ids [n, k], logprobs [n, k]) for each prompt position;
    `target` = (logprobs [n-1, K], the request's CSR layout or None: dense);
    `alt` = (tokens [n-1, k], logprobs [n-1, k]); `cache_hit_tokens`: prompt tokens whose
    KV the sampler found already computed."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=cache_hit_tokens)
    if target is not None:
        msg.target_prompt_logprobs.CopyFrom(_out_tensor(*target))
    if alt is not None:
        msg.prompt_alt_tokens.tokens.CopyFrom(_out_tensor(alt[0], None))
        msg.prompt_alt_tokens.logprobs.CopyFrom(_out_tensor(alt[1], None))
    for s in sequences:
        stop = pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq = pb.SampledSequence(
            stop_reason=stop,
            tokens=np.asarray(s.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(s.logprobs, dtype="<f4").tobytes(),
        )
        if s.topk is not None:
            seq.topk_sampled_logprobs.CopyFrom(_topk(*s.topk))
        msg.sequences.append(seq)
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype="<f4").tobytes()
    if topk_prompt is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(*topk_prompt))
    return msg.SerializeToString()


def decode_sample_sequences(result: bytes) -> list[WireSequence]:
    """The sequences of a stored SampleResponse (tokens, sampled-token logprobs, top-k)."""
    msg = pb.SampleResponse()
    msg.ParseFromString(result)
    return [
        WireSequence(
            tokens=np.frombuffer(seq.tokens, dtype="<i4").tolist(),
            logprobs=np.frombuffer(seq.logprobs, dtype="<f4").tolist(),
            stop_reason="stop" if seq.stop_reason == pb.STOP_REASON_STOP else "length",
            topk=_read_topk(seq.topk_sampled_logprobs)
            if seq.HasField("topk_sampled_logprobs") else None,
        )
        for seq in msg.sequences
    ]


def _read_topk(topk: pb.TopkLogprobs) -> tuple[np.ndarray, np.ndarray]:
    shape = (topk.length, topk.k)
    return (np.frombuffer(topk.token_ids, dtype="<i4").reshape(shape),
            np.frombuffer(topk.logprobs, dtype="<f4").reshape(shape))
