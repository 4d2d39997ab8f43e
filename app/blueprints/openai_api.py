"""An OpenAI-compatible API beside Tinker's: /v1/models, /v1/completions and
/v1/chat/completions, for the `openai` client and tools built on it (key: `Authorization:
Bearer tml-...`).

`model` is a served base model's name, or a tinker:// path of sampler weights (or a training
checkpoint's). Each call is a Tinker sample on a sampling session the API keeps per key and
model (in a session of the key's named openai-...), so it is batched with every other sample
on the worker. The prompt is encoded with the base model's tokenizer; a chat is rendered with
its chat template. `stream=true` answers server-sent events, a chunk per token, once the
sample is done (the engine hands back whole samples). Stop strings are cut from the text,
as OpenAI does. `logprobs` / `top_logprobs` come from the sampler's log-probs and
topk_sample_logprobs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy.exc import IntegrityError

from app import metrics
from app.blueprints.common import json_body, services, tenant
from app.blueprints.futures import fetch, finished
from protocol.checks import field
from protocol.errors import RequestError, bad
from protocol.wire import WireSequence, decode_sample_sequences
from store.schema import FAILED, SessionRow
from store.text import TextCodec
from tasks import calls

bp = Blueprint("openai", __name__)
MAX_PROMPTS = 16
MAX_TOP_LOGPROBS = 20


@bp.get("/models")
def models() -> dict[str, Any]:
    names = services().settings.served_model_names()
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                        "owned_by": "tinkerq"} for n in names]}


@bp.post("/completions")
def completions() -> Any:
    body = json_body()
    prompts = _prompts(body.get("prompt"))
    top = field(body, "logprobs", int, None)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad(f"logprobs={top} must be in [0, {MAX_TOP_LOGPROBS}]")
    return _answer(body, prompts, top, chat=False)


@bp.post("/chat/completions")
def chat_completions() -> Any:
    body = json_body()
    messages = field(body, "messages", list)
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               for m in messages):
        raise bad("messages must be a non-empty list of {role, content} objects")
    prompt = _codec().chat([{**m, "content": _content(m.get("content"))} for m in messages])
    top = field(body, "top_logprobs", int, 0) if body.get("logprobs") else None
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad(f"top_logprobs={top} must be in [0, {MAX_TOP_LOGPROBS}]")
    return _answer(body, [prompt], top, chat=True)


# --- the call ---------------------------------------------------------------------------------


def _answer(body: dict[str, Any], prompts: list[list[int]], top: int | None, chat: bool
            ) -> Any:
    model = field(body, "model", str)
    n = field(body, "n", int, 1)
    stops = body.get("stop")
    stops = [stops] if isinstance(stops, str) else list(stops or [])
    params = {"temperature": field(body, "temperature", float, 1.0),
              "top_p": field(body, "top_p", float, 1.0), "top_k": field(body, "top_k", int, -1),
              "seed": field(body, "seed", int, None), "stop": stops}
    limit = body.get("max_completion_tokens", body.get("max_tokens", None if chat else 16))
    if limit is not None:
        params["max_tokens"] = limit
    sampler_id = _sampler_for(model)
    ids = [_submit(sampler_id, p, n, params, top or 0) for p in prompts]
    choices, used = [], 0
    for i, request_id in enumerate(ids):
        for j, seq in enumerate(_wait(request_id)):
            choices.append(_choice(i * n + j, seq, stops, top, chat))
            used += len(seq.tokens)
    usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": used,
             "total_tokens": sum(map(len, prompts)) + used}
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{ids[0]}", "created": int(time.time()),
            "model": model}
    if body.get("stream"):
        return Response(_stream(head, choices, chat), mimetype="text/event-stream")
    kind = "chat.completion" if chat else "text_completion"
    return jsonify({**head, "object": kind, "choices": [c["final"] for c in choices],
                    "usage": usage})


def _sampler_for(model: str) -> str:
    """The key's sampling session for `model`, made on first use."""
    sub, me = services().submit, tenant()
    session_id = f"openai-{me[:24]}"
    try:
        with services().store.transaction() as s:
            if s.get(SessionRow, session_id) is None:
                s.add(SessionRow(id=session_id, tenant=me, tags=["openai"],
                                 display_name="OpenAI-compatible API"))
    except IntegrityError:
        pass  # a concurrent first call made it
    n = int(hashlib.sha256(model.encode()).hexdigest()[:12], 16)
    source = {"model_path": model} if model.startswith("tinker://") else {"base_model": model}
    body = {"session_id": session_id, "sampling_session_seq_id": n, **source}
    return calls.create_sampler(sub, me, body).id


def _submit(sampler_id: str, prompt: list[int], n: int, params: dict[str, Any], top: int
            ) -> str:
    body = {"sampling_session_id": sampler_id, "seq_id": secrets.randbits(62),
            "num_samples": n, "sampling_params": params, "topk_sample_logprobs": top,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}}
    return str(calls.sample(services().submit, tenant(), body)["request_id"])


def _wait(request_id: str) -> list[WireSequence]:
    deadline = time.monotonic() + services().settings.openai_timeout_s
    with metrics.parked(), services().doorbell.listen(request_id) as rang:
        row = fetch(request_id)
        while not finished(row) and (left := deadline - time.monotonic()) > 0:
            rang.wait(min(left, 5.0))
            rang.clear()
            row = fetch(request_id)
    if not finished(row):
        raise RequestError(504, f"the sample {request_id} did not finish within "
                                f"openai_timeout_s={services().settings.openai_timeout_s}")
    if row.state == FAILED:
        raise RequestError(400 if row.error_category == "user" else 502, str(row.error))
    return decode_sample_sequences(row.result)


# --- formats ----------------------------------------------------------------------------------


def _choice(index: int, seq: WireSequence, stops: list[str], top: int | None, chat: bool
            ) -> dict[str, Any]:
    codec = _codec()
    text = codec.decode(seq.tokens)
    cut = min([i for i in (text.find(s) for s in stops if s) if i >= 0], default=len(text))
    text, reason = text[:cut], "stop" if seq.stop_reason == "stop" else "length"
    logprobs = None if top is None else _logprobs(seq, top, chat)
    final: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
    if chat:
        final["message"] = {"role": "assistant", "content": text}
    else:
        final["text"] = text
    return {"final": final, "pieces": _pieces(codec, seq.tokens, len(text))}


def _logprobs(seq: WireSequence, top: int, chat: bool) -> dict[str, Any]:
    codec = _codec()
    texts = [codec.token_text(t) for t in seq.tokens]
    alts: list[list[tuple[str, float]]] = [[] for _ in seq.tokens]
    if seq.topk is not None:
        ids, lps = seq.topk
        alts = [[(codec.token_text(int(i)), float(v)) for i, v in zip(row, values, strict=True)]
                for row, values in zip(ids, lps, strict=True)]
    if chat:
        return {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()),
             "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())}
                              for a, v in alt]}
            for t, lp, alt in zip(texts, seq.logprobs, alts, strict=True)]}
    offsets = [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": seq.logprobs, "text_offset": offsets,
            "top_logprobs": [dict(alt) for alt in alts] if top else None}


def _pieces(codec: TextCodec, tokens: list[int], length: int) -> list[str]:
    """The text in one piece per token (a piece may be empty while a character is split
    across tokens), up to `length` characters."""
    pieces, before = [], ""
    for i in range(len(tokens)):
        now = codec.decode(tokens[: i + 1])[:length]
        if now.startswith(before):
            pieces.append(now[len(before):])
            before = now
    return pieces


def _stream(head: dict[str, Any], choices: list[dict[str, Any]], chat: bool) -> Iterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(index: int, delta: dict[str, Any] | str, reason: str | None) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": reason}
        choice |= {"delta": delta} if chat else {"text": delta, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

    for c in choices:
        index = c["final"]["index"]
        if chat:
            yield event(index, {"role": "assistant", "content": ""}, None)
        for piece in c["pieces"]:
            yield event(index, {"content": piece} if chat else piece, None)
        yield event(index, {} if chat else "", c["final"]["finish_reason"])
    yield "data: [DONE]\n\n"


# --- inputs -----------------------------------------------------------------------------------


def _codec() -> TextCodec:
    return _codec_of(str(services().model.path))


@functools.lru_cache(maxsize=4)
def _codec_of(folder: str) -> TextCodec:
    return TextCodec(Path(folder))


def _prompts(prompt: Any) -> list[list[int]]:
    """A prompt: a string, token ids, or a list of up to MAX_PROMPTS strings."""
    if isinstance(prompt, str):
        return [_codec().encode(prompt)]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [list(prompt)]
    if (isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS
            and all(isinstance(p, str) for p in prompt)):
        return [_codec().encode(p) for p in prompt]
    raise bad(f"prompt must be a string, a list of token ids, or a list of 1 to {MAX_PROMPTS} "
              "strings")


def _content(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise bad("only text content parts are supported: the served models are text-only")
        return "".join(str(p.get("text", "")) for p in content)
    raise bad("a message's content must be a string or a list of text parts")
