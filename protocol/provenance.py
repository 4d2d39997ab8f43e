"""stable_reinforce's provenance: which recorded sampled sequence each datum position is.

A datum trained with `stable_reinforce` names, through `Datum.with_provenance`, the sampled
sequences its tokens came from: runs of the model input and runs of the targets, each a
`PromptProvenanceSpan` (positions of that sample request's prompt) or a
`SampledProvenanceSpan` (positions of its sampled tokens). The runs tile their field. The
server checks each run against what it recorded when it sampled (the tokens must be the
recorded ones) and takes the sampler's own log-probabilities of the sampled targets from
the record, so the loss weighs each token by the policy that really drew it, whatever the
client sends. NumPy only: the API resolves provenance before the call is stored.

    sequence_ids(data)        -> every sequence id the data names
    resolve(data, recorded)   -> per datum, the loss inputs the record fixes
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.losses import ProtocolError
from protocol.wire import Span, WireDatum


@dataclass(frozen=True)
class Recorded:
    """What sampling with record_stability_info=True kept of one sampled sequence."""

    prompt: list[int]
    tokens: list[int]  # the sampled tokens
    logprobs: list[float]  # the sampler's log-probability of each sampled token


def sequence_ids(data: list[WireDatum]) -> set[str]:
    return {span.sequence_id for d in data
            for span in (d.input_spans or []) + (d.target_spans or [])}


def resolve(data: list[WireDatum], recorded: dict[str, Recorded]) -> list[dict[str, np.ndarray]]:
    """Check every datum's provenance against `recorded` (which holds every id the data
    names) and give its loss inputs: `logprobs` with the recorded sampler log-probs at the
    sampled target positions (the client's elsewhere) and `sampled_mask` (1 there, else 0).
    Advantages must be zero off the sampled targets. Raises ProtocolError naming the datum,
    the run and the first disagreeing position."""
    out = []
    for i, d in enumerate(data):
        if d.input_spans is None or d.target_spans is None:
            raise ProtocolError(
                f"data[{i}] carries no provenance; stable_reinforce trains on recorded "
                "samples only: sample with record_stability_info=True and name each "
                "sequence_id with Datum.with_provenance")
        targets = d.inputs.get("target_tokens")
        if targets is None or targets.ndim != 1:
            raise ProtocolError(f"data[{i}].loss_fn_inputs['target_tokens'] must be 1-D "
                                "for stable_reinforce")
        _match(f"data[{i}].model_input", d.input_spans, d.tokens, recorded, True)
        # Target runs over the prompt carry no loss (their advantages are 0), and the
        # cookbook fills their tokens with 0: only sampled targets must be the recorded ones.
        q, mask = _match(f"data[{i}].loss_fn_inputs['target_tokens']", d.target_spans,
                         targets, recorded, False)
        advantages = d.inputs.get("advantages")
        if advantages is not None and advantages.shape == mask.shape:
            off = np.flatnonzero((mask == 0) & (advantages != 0))
            if off.size:
                raise ProtocolError(
                    f"data[{i}].loss_fn_inputs['advantages'] is {float(advantages[off[0]])} "
                    f"at position {int(off[0])}, a prompt token; stable_reinforce takes "
                    "advantages on sampled tokens only")
        logprobs = np.array(d.inputs.get("logprobs", np.zeros(len(mask))), dtype=np.float32)
        if logprobs.shape != mask.shape:
            raise ProtocolError(f"data[{i}].loss_fn_inputs['logprobs'] has shape "
                                f"{list(logprobs.shape)}; it must be [{len(mask)}]")
        logprobs[mask == 1] = q[mask == 1]
        out.append({"logprobs": logprobs, "sampled_mask": mask})
    return out


def _match(where: str, spans: list[Span], values: np.ndarray, recorded: dict[str, Recorded],
           prompt_tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    """Check that `spans` tile `values` with recorded tokens (those of prompt runs only if
    `prompt_tokens`); give the recorded log-probs and the sampled mask over `values`."""
    total = sum(span.length for span in spans)
    if total != len(values):
        raise ProtocolError(f"{where} has {len(values)} positions but its provenance runs "
                            f"cover {total}")
    q = np.zeros(len(values), dtype=np.float32)
    mask = np.zeros(len(values), dtype=np.float32)
    at = 0
    for k, span in enumerate(spans):
        record = recorded[span.sequence_id]
        source = record.tokens if span.sampled else record.prompt
        what = "sampled tokens" if span.sampled else "prompt"
        if span.offset < 0 or span.length < 0 or span.offset + span.length > len(source):
            raise ProtocolError(
                f"{where} run {k} names positions [{span.offset}, {span.offset + span.length}) "
                f"of sequence {span.sequence_id!r}'s {what}, which has {len(source)}")
        want = np.asarray(source[span.offset:span.offset + span.length], dtype=np.int64)
        got = values[at:at + span.length]
        differ = np.flatnonzero(got != want) if span.sampled or prompt_tokens else []
        if len(differ):
            j = int(differ[0])
            raise ProtocolError(
                f"{where} position {at + j} is token {int(got[j])}, but run {k} names "
                f"token {int(want[j])} of sequence {span.sequence_id!r}'s {what} "
                f"(position {span.offset + j})")
        if span.sampled:
            q[at:at + span.length] = record.logprobs[span.offset:span.offset + span.length]
            mask[at:at + span.length] = 1.0
        at += span.length
    return q, mask
