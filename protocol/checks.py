"""Input checks done before anything is stored, shared by REST and batch scripts (both
through tasks.submit). Each raises RequestError(400) whose message names the bad value and
the limit; the worker trusts what passes."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np

from config.settings import Settings
from protocol.errors import RequestError, bad
from protocol.losses import INTEGER_INPUTS, ProtocolError, check_loss_inputs, resolve_loss_config
from protocol.wire import FwdBwdRequest

T = TypeVar("T")
MISSING: Any = object()
_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
    dict: "an object",
    list: "a list",
}
MAX_NUM_SAMPLES = 128
# Every integer a request carries fits a signed 64-bit column (seq_ids, seeds, offsets);
# every float is finite; every string fits its column (MAX_STRING unless a field says less).
INT64 = 1 << 63
MAX_STRING = 256


def field(
    body: dict[str, Any], name: str, kind: type[T], default: Any = MISSING, where: str = "",
    max_len: int = MAX_STRING,
) -> T:
    """body[name] checked to be `kind` (ints pass as floats, bools never pass as numbers),
    within the limits above."""
    value = body.get(name)
    if value is None:
        if default is MISSING:
            raise RequestError(400, f"{where}{name} is required")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise RequestError(400, f"{where}{name}={_cut(value)} must be {_KIND_NAMES[kind]}")
    if kind is int and not -INT64 <= value < INT64:
        raise RequestError(400, f"{where}{name}={_cut(value)} is outside the signed 64-bit "
                                f"range [-2**63, 2**63)")
    if kind is float and not math.isfinite(value):
        raise RequestError(400, f"{where}{name}={value!r} must be a finite number")
    if kind is str and len(value) > max_len:
        raise RequestError(400, f"{where}{name}={_cut(value)} has {len(value)} characters; "
                                f"limit {max_len}")
    return value


def _cut(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_seq_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < INT64:
        raise bad(f"seq_id={_cut(value)} must be an integer in [1, 2**63) (0 is the model's "
                  "creation)")
    return value


def check_base_model(name: str, settings: Settings) -> str:
    served = settings.served_model_names()
    if name not in served:
        raise bad(f"base_model {name!r} is not served here; served models: {served}")
    return name


def check_lora(cfg: dict[str, Any], settings: Settings) -> dict[str, Any]:
    where = "lora_config."
    rank = field(cfg, "rank", int, 32, where)
    if not 1 <= rank <= settings.max_lora_rank:
        raise bad(f"lora_config.rank={rank} must be in [1, {settings.max_lora_rank}]")
    lora = {"rank": rank, "seed": field(cfg, "seed", int, None, where)}
    for name in ("train_attn", "train_mlp", "train_unembed"):
        lora[name] = field(cfg, name, bool, True, where)
    if not (lora["train_attn"] or lora["train_mlp"] or lora["train_unembed"]):
        raise bad("lora_config must train at least one of train_attn, train_mlp, train_unembed")
    return lora


def check_optimizer_config(cfg: Any) -> None:
    kind = cfg.get("type", "adamw") if isinstance(cfg, dict) else cfg
    if kind not in (None, "adamw"):
        raise bad(f"optimizer_config type {kind!r} is not supported (supported: 'adamw')")


def check_adam(params: dict[str, Any]) -> dict[str, float]:
    where = "adam_params."
    p = {
        "learning_rate": field(params, "learning_rate", float, 1e-4, where),
        "beta1": field(params, "beta1", float, 0.9, where),
        "beta2": field(params, "beta2", float, 0.95, where),
        "eps": field(params, "eps", float, 1e-12, where),
        "weight_decay": field(params, "weight_decay", float, 0.0, where),
        "grad_clip_norm": field(params, "grad_clip_norm", float, 0.0, where),
    }
    for name in ("learning_rate", "weight_decay", "grad_clip_norm"):
        if not p[name] >= 0:
            raise bad(f"adam_params.{name}={p[name]} must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= p[name] < 1:
            raise bad(f"adam_params.{name}={p[name]} must be in [0, 1)")
    if not p["eps"] > 0:
        raise bad(f"adam_params.eps={p['eps']} must be > 0")
    return p


def check_tokens(tokens: np.ndarray, vocab: int, where: str) -> None:
    tokens = tokens.ravel()  # [N, K] top-k targets: positions are flat indices
    outside = np.flatnonzero((tokens < 0) | (tokens >= vocab))
    if outside.size:
        i = int(outside[0])
        raise bad(
            f"{where} token {int(tokens[i])} at position {i} is outside the vocabulary [0, {vocab})"
        )


def check_forward_backward(req: FwdBwdRequest, settings: Settings, vocab: int) -> None:
    if not req.data:
        raise bad("data is empty: forward_backward needs at least one datum")
    try:
        resolve_loss_config(req.loss_fn, req.loss_fn_config)
        for i, datum in enumerate(req.data):
            n = len(datum.tokens)
            if n == 0:
                raise bad(f"data[{i}] has an empty model_input")
            if n > settings.max_seq_len:
                raise bad(f"data[{i}] has {n} tokens; limit max_seq_len={settings.max_seq_len}")
            check_tokens(datum.tokens, vocab, f"data[{i}].model_input")
            check_loss_inputs(req.loss_fn, i, n, datum.inputs)
            for name, arr in datum.inputs.items():
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    at = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
                    raise bad(f"data[{i}].loss_fn_inputs[{name!r}] holds {arr.ravel()[at]} "
                              f"at flat index {at}; every value must be finite")
            for name in INTEGER_INPUTS & datum.inputs.keys():
                arr = datum.inputs[name]
                if arr.dtype.kind not in "iu":
                    raise bad(
                        f"data[{i}].loss_fn_inputs[{name!r}] has dtype {arr.dtype}; "
                        "it must be int64"
                    )
                check_tokens(arr, vocab, f"data[{i}].loss_fn_inputs[{name!r}]")
    except ProtocolError as e:
        raise bad(str(e)) from e


def text_only(settings: Settings) -> str:
    """What an image or audio chunk is told: every served model is text-only."""
    return f"the served base models {settings.served_model_names()} are text-only"


def check_prompt(prompt: Any, vocab: int, settings: Settings) -> list[int]:
    chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
    if not isinstance(chunks, list):
        raise bad("prompt must be a ModelInput object {'chunks': [...]}")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise bad(f"prompt.chunks[{i}] has type {kind!r}; {text_only(settings)}")
        ids = chunk.get("tokens")
        if not isinstance(ids, list) or any(type(t) is not int for t in ids):
            raise bad(f"prompt.chunks[{i}].tokens must be a list of integers")
        tokens += ids
    if not tokens:
        raise bad("prompt is empty: it needs at least one token")
    for pos, t in enumerate(tokens):
        if not 0 <= t < vocab:
            raise bad(f"prompt token {t} at position {pos} is outside the vocabulary [0, {vocab})")
    return tokens


def check_stop(stop: Any, vocab: int) -> dict[str, Any]:
    """None = stop at EOS only; [] = no stop at all (not even EOS); str | [str] | [int]."""
    if stop is None:
        return {"stop_strings": [], "stop_token_ids": [], "stop_at_eos": True}
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list):
        raise bad(f"sampling_params.stop={stop!r} must be a string, a list of strings or ints")
    if all(isinstance(s, str) and s for s in stop):
        return {"stop_strings": stop, "stop_token_ids": [], "stop_at_eos": bool(stop)}
    if all(type(s) is int for s in stop):
        for s in stop:
            if not 0 <= s < vocab:
                raise bad(f"sampling_params.stop token {s} is outside the vocabulary [0, {vocab})")
        return {"stop_strings": [], "stop_token_ids": stop, "stop_at_eos": True}
    raise bad(f"sampling_params.stop={stop!r} must be non-empty strings or token ids, not mixed")


MAX_PROMPT_CELLS = 1 << 22  # len(prompt) x (distinct target ids | alternatives drawn)
MAX_ALT_TOKENS = 128


def check_prompt_scoring(body: dict[str, Any], prompt: list[int], vocab: int
                         ) -> dict[str, Any]:
    """prompt_logprobs_last_n, prompt_alt_tokens_k and target_prompt_logprobs, checked
    against the prompt; the target ids as a dense [len(prompt) - 1, K] list (-1: none) with
    the request's CSR layout, if it was sparse, for the answer to keep."""
    rows = len(prompt) - 1
    last_n = field(body, "prompt_logprobs_last_n", int, None)
    if last_n is not None and not (body.get("prompt_logprobs") and 1 <= last_n <= rows):
        raise bad(f"prompt_logprobs_last_n={last_n} needs prompt_logprobs=true and must be "
                  f"in [1, len(prompt) - 1 = {rows}]")
    alt_k = field(body, "prompt_alt_tokens_k", int, 0)
    if not 0 <= alt_k <= MAX_ALT_TOKENS or (alt_k and not 1 <= rows * alt_k <= MAX_PROMPT_CELLS):
        raise bad(f"prompt_alt_tokens_k={alt_k} must be in [0, {MAX_ALT_TOKENS}], with a prompt "
                  f"of at least 2 tokens and len(prompt) x k <= {MAX_PROMPT_CELLS}")
    target = body.get("target_prompt_logprobs")
    return {"prompt_logprobs_last_n": last_n, "prompt_alt_tokens_k": alt_k,
            "target_prompt": None if target is None else _target_ids(target, rows, vocab)}


def _target_ids(target: Any, rows: int, vocab: int) -> dict[str, Any]:
    where = "target_prompt_logprobs"
    if not isinstance(target, dict) or target.get("dtype") != "int64":
        raise bad(f"{where} must be an int64 tensor of token ids")
    shape, data = target.get("shape"), target.get("data")
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == rows
            and isinstance(shape[1], int) and shape[1] >= 1 and isinstance(data, list)):
        raise bad(f"{where} has shape {str(shape)[:40]}; it must be [len(prompt) - 1 = {rows}, K]")
    if rows * shape[1] > MAX_PROMPT_CELLS:
        raise bad(f"{where} has shape {shape}: more than {MAX_PROMPT_CELLS} cells")
    crow, col = target.get("sparse_crow_indices"), target.get("sparse_col_indices")
    dense = [[-1] * shape[1] for _ in range(rows)]
    try:
        if crow is None:
            if len(data) != rows * shape[1]:
                raise ValueError(f"{len(data)} values for shape {shape}")
            for i in range(rows):
                dense[i] = [int(x) for x in data[i * shape[1]:(i + 1) * shape[1]]]
        else:
            if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(data) != len(col):
                raise ValueError("malformed CSR row offsets or columns")
            for i in range(rows):
                for j in range(crow[i], crow[i + 1]):
                    dense[i][col[j]] = int(data[j])
    except (ValueError, TypeError, IndexError) as e:
        raise bad(f"{where} is not a valid tensor: {e}") from None
    ids = {t for row in dense for t in row}
    if not ids <= set(range(-1, vocab)) or ids <= {-1}:
        raise bad(f"{where} must name at least one id, each in [0, {vocab}) or -1 for none")
    if (rows + 1) * len(ids - {-1}) > MAX_PROMPT_CELLS:
        raise bad(f"{where}: len(prompt) x {len(ids - {-1})} distinct ids is over "
                  f"{MAX_PROMPT_CELLS}")
    layout = None if crow is None else {"crow": list(crow), "col": list(col)}
    return {"ids": dense, "layout": layout}


def check_sample(body: dict[str, Any], settings: Settings, vocab: int,
                 context: int | None = None) -> dict[str, Any]:
    """The engine's sample payload (all but adapter_dir) from an asample body. A sequence
    fits max_seq_len and the model's context (`context`, its max_position_embeddings)."""
    n = field(body, "num_samples", int, 1)
    if not 1 <= n <= MAX_NUM_SAMPLES:
        raise bad(f"num_samples={n} must be in [1, {MAX_NUM_SAMPLES}]")
    prompt = check_prompt(body.get("prompt"), vocab, settings)
    params = field(body, "sampling_params", dict, {})
    where = "sampling_params."
    limit, limit_name = settings.max_seq_len, "max_seq_len"
    if context is not None and context < limit:
        limit, limit_name = context, "the model's context (max_position_embeddings)"
    room = limit - len(prompt)
    if room < 1:
        raise bad(f"prompt has {len(prompt)} tokens; it leaves no room to sample within "
                  f"{limit_name}={limit}")
    max_tokens = field(params, "max_tokens", int, min(settings.max_sample_tokens, room), where)
    if not 1 <= max_tokens <= settings.max_sample_tokens:
        raise bad(f"max_tokens={max_tokens} must be in [1, {settings.max_sample_tokens}]")
    if max_tokens > room:
        raise bad(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds "
                  f"{limit_name}={limit}")
    temperature = field(params, "temperature", float, 1.0, where)
    top_p = field(params, "top_p", float, 1.0, where)
    top_k = field(params, "top_k", int, -1, where)
    if not temperature >= 0:
        raise bad(f"temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise bad(f"top_p={top_p} must be in (0, 1]")
    if top_k != -1 and top_k < 1:
        raise bad(f"top_k={top_k} must be -1 (off) or >= 1")
    topk_prompt = field(body, "topk_prompt_logprobs", int, 0)
    if not 0 <= topk_prompt <= vocab:
        raise bad(f"topk_prompt_logprobs={topk_prompt} must be in [0, {vocab}]")
    topk_sample = field(body, "topk_sample_logprobs", int, 0)
    if not 0 <= topk_sample <= min(vocab, MAX_ALT_TOKENS):
        raise bad(f"topk_sample_logprobs={topk_sample} must be in "
                  f"[0, {min(vocab, MAX_ALT_TOKENS)}]")
    return {
        "prompt": prompt,
        "num_samples": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": field(params, "seed", int, None, where),
        **check_stop(params.get("stop"), vocab),
        "prompt_logprobs": field(body, "prompt_logprobs", bool, False),
        "topk_prompt_logprobs": topk_prompt,
        "topk_sample_logprobs": topk_sample,
        **check_prompt_scoring(body, prompt, vocab),
    }
