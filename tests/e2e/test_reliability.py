"""Nothing accepted is lost: calls made while the worker or the API is down are answered.

Also the bad-input rule end to end: a user error fails its own future with category
`user`, and the same model keeps working afterwards.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.stack import API_KEY, Stack
from tests.e2e.test_sdk import BASE, DATA, forward_logprobs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-reliability"), "sqlite")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(stack):
    return tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)


def test_call_made_while_the_worker_is_down_is_answered_after_restart(service, stack):
    stack.kill("worker")
    result: dict = {}

    def create() -> None:
        tc = service.create_lora_training_client(BASE, rank=4).result()
        result["logprobs"] = forward_logprobs(tc)

    thread = threading.Thread(target=create, daemon=True)
    thread.start()
    time.sleep(3.0)
    assert "logprobs" not in result  # queued in Redis + the database, nobody to run it
    stack.restart("worker")
    thread.join(120)
    assert len(result["logprobs"]) == len(DATA), stack.logs()


def test_future_outlives_an_api_restart(service, stack):
    tc = service.create_lora_training_client(BASE, rank=4).result()
    stack.kill("web")
    future = tc.forward(DATA, "cross_entropy")  # the SDK retries the submit until the API is up
    time.sleep(1.0)
    stack.restart("web")
    out = future.result(timeout=120)
    assert len(out.loss_fn_outputs) == len(DATA)


def test_user_error_fails_its_own_future_and_the_model_keeps_working(service):
    tc = service.create_lora_training_client(BASE, rank=4).result()
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": np.array([1, 2, 3]),
                                      "weights": np.ones(2, dtype=np.float32)})
    with pytest.raises(tinker.BadRequestError, match=r"shape \[2\].*\[3\]"):
        tc.forward_backward([bad], "cross_entropy").result()
    # The rejected call consumed its seq_id; the next one is not stuck behind a gap.
    assert len(forward_logprobs(tc)) == len(DATA)
    with pytest.raises(tinker.BadRequestError, match="max_tokens"):
        sampler = tc.save_weights_and_get_sampling_client().result()
        sampler.sample(types.ModelInput.from_ints([1, 2]), 1,
                       types.SamplingParams(max_tokens=0)).result()
