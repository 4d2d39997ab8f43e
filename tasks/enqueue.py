"""Send the Celery task of a stored request, from the API or a batch script.

Only ids travel: the task reads its payload from the database. Called after the request's
transaction has committed, so the worker always finds the row.
"""

from __future__ import annotations

from collections.abc import Callable

from celery.canvas import Signature

from config import Settings
from store.schema import RequestRow


def task_name(kind: str) -> str:
    """One Celery task name per Tinker verb, so Flower lists calls by what they do."""
    return f"tinker.{kind}"


def make_enqueuer(settings: Settings) -> Callable[[RequestRow], None]:
    from tasks.celery_app import celery_app

    def enqueue(row: RequestRow) -> None:
        celery_app.send_task(
            task_name(row.kind),
            args=[row.id],
            kwargs={"summary": row.summary},
            queue=row.queue,
        )

    return enqueue


RELEASE_TASK = "tinkerq.release_runs"


def make_retirer(settings: Settings) -> Callable[[str, list[str]], None]:
    """Ask a queue's worker to release runs from memory once their calls are done (their
    session finished)."""
    from tasks.celery_app import celery_app

    def retire(queue: str, model_ids: list[str]) -> None:
        celery_app.send_task(RELEASE_TASK, args=[model_ids], queue=queue)

    return retire


def signature(row: RequestRow) -> Signature:
    """The immutable signature of a stored call (a batch's chain): its verb's task, its
    queue, its id."""
    from tasks.celery_app import celery_app

    return celery_app.signature(
        task_name(row.kind),
        args=[row.id],
        kwargs={"summary": row.summary},
        queue=row.queue,
        immutable=True,
    )


def request_id(sig: Signature) -> str:
    """The request id a signature carries (REST `retrieve_future` takes it)."""
    return sig.args[0]
