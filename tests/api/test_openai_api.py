"""The OpenAI-compatible routes on the API, the worker played by the test: the sample they
submit, stop strings cut from the text, the streamed pieces, errors in OpenAI's shape."""

from __future__ import annotations

import json
import threading
import time

from protocol.wire import WireSequence, encode_sample_response
from tests.api.conftest import ALIAS, KEY

BEARER = {"Authorization": f"Bearer {KEY}"}
HELLO, WORLD = 5, 6  # ids in the test tokenizer (tests/api/conftest.write_tokenizer)


def answer_when_sent(enqueued, finish, tokens: list[int]) -> threading.Thread:
    """Play the worker: answer the first sample the API sends with `tokens`."""
    def run() -> None:
        deadline = time.monotonic() + 10
        while not enqueued and time.monotonic() < deadline:
            time.sleep(0.01)
        proto = encode_sample_response([WireSequence(tokens, [-0.5] * len(tokens), "stop")])
        finish(enqueued[0].id, proto=proto)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_completion_is_a_sample_with_the_stop_string_cut(api, enqueued, finish):
    worker = answer_when_sent(enqueued, finish, [HELLO, WORLD, HELLO])
    resp = api.client.post("/v1/completions", headers=BEARER, json={
        "model": ALIAS, "prompt": "hello world", "max_tokens": 3, "stop": "world", "seed": 3})
    worker.join()
    assert resp.status_code == 200, resp.get_json()
    answer = resp.get_json()
    [row] = enqueued
    payload = json.loads(row.payload)
    assert payload["prompt"] == [HELLO, WORLD] and payload["stop_strings"] == ["world"]
    assert (payload["max_tokens"], payload["seed"]) == (3, 3)
    [choice] = answer["choices"]
    assert choice["text"] == "hello " and choice["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_a_streamed_chat_sends_its_text_in_pieces(api, enqueued, finish):
    worker = answer_when_sent(enqueued, finish, [HELLO, WORLD])
    resp = api.client.post("/v1/chat/completions", headers=BEARER, json={
        "model": ALIAS, "messages": [{"role": "user", "content": "hello"}], "stream": True})
    lines = [ln for ln in resp.get_data(as_text=True).split("\n\n") if ln]
    worker.join()
    assert resp.mimetype == "text/event-stream" and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "hello world" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    prompt = json.loads(enqueued[0].payload)["prompt"]
    assert prompt == [1, 3, HELLO, 2, 1, 4]  # the chat template, ready for the assistant


def test_errors_have_openai_s_shape(api, app):
    resp = app.test_client().post("/v1/completions", json={"model": ALIAS, "prompt": "x"})
    assert resp.status_code == 401 and "Bearer" in resp.get_json()["error"]["message"]
    resp = api.client.post("/v1/chat/completions", headers=BEARER, json={
        "model": ALIAS, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["type"] == "invalid_request_error"
    assert "text-only" in resp.get_json()["error"]["message"]
