"""One job's run inside a tick, kept from the others: its payload, decoded or refused
(`body`), and its failure as its own outcome (`attempt`): bad input is a `user` error, a
crash a `server` one, and the tick goes on with the other jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from protocol.jobs import Job, Outcome, UserError
from protocol.losses import ProtocolError
from protocol.wire import WireError

log = logging.getLogger("workers.executor")


def body(job: Job) -> Any:
    """The job's decoded payload; a payload that did not decode fails the job alone."""
    if job.invalid is not None:
        raise UserError(job.invalid)
    return job.body


def attempt(fn: Callable[[Job], Any], job: Job) -> tuple[Any, Outcome | None]:
    """Call fn(job); a raised error becomes that job's failure (`user` for bad input)."""
    try:
        return fn(job), None
    except (UserError, ProtocolError, WireError) as e:
        return None, Outcome.fail(str(e), "user")
    except Exception as e:  # noqa: BLE001 - one job's crash must not take the tick down
        log.exception("job %s (%s) failed", job.request_id, job.kind)
        return None, Outcome.fail(f"{type(e).__name__}: {e}", "server")
