"""The Celery app, built from the same typed settings as the web process (the environment's).

Choices and why:
- acks_late + reject_on_worker_lost: a task is acknowledged only after its result is
  stored, so a worker that dies mid-call gets the call redelivered; the request row's state
  makes the rerun harmless (a finished row is never computed again).
- prefetch multiplier 1 with a thread pool: each thread holds one call, all of them wait
  on the one engine thread, which batches whatever is waiting at each tick.
- no result backend: results live in the database (the request rows), not in Celery.
- task events on, so Flower shows every Tinker call as a task.
"""

from __future__ import annotations

from celery import Celery

from config import Settings, load_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("tinkerq", broker=settings.redis, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # Redis away for a while: wait for it, never quit
        # A call may wait behind a long tick; redelivery only after a real loss.
        broker_transport_options={"visibility_timeout": 6 * 3600},
        worker_hijack_root_logger=False,
    )
    app.conf.tinkerq_settings = settings
    return app


celery_app = make_celery(load_settings())
