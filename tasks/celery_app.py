"""The Celery app, built from the same typed settings as the web process (the environment's).

Choices and why:
- acks_late + reject_on_worker_lost: a task is acknowledged only after its result is
  stored, so a worker that dies mid-call gets the call redelivered; the request row's state
  makes the rerun harmless (a finished row is never computed again).
- prefetch multiplier 1 with a thread pool: each thread holds one call, all of them wait
  on the one engine thread, which batches whatever is waiting at each tick.
- no result backend: results live in the database (the request rows), not in Celery.
- task events on, so Flower shows every Tinker call as a task.
- a lost Redis connection must not stop the worker (`OutliveLostBroker`). Two things that
  kombu does on a channel whose connection is gone raise an AttributeError, which Celery
  takes for an unrecoverable error: restoring the unacknowledged messages when the channel
  closes, and acknowledging, after the reconnection, a call that ran meanwhile. Both are
  skipped on such a channel. Nothing is lost: a starting worker puts back what an earlier
  one held (`tasks.tinker.restore_orphans`), the request sweep sends again what no one holds,
  and a call run twice is answered from its row.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps, signals

from config import Settings, load_settings, logs


class OutliveLostBroker(bootsteps.StartStopStep):
    """At each (re)connection of the worker's consumer: its channel keeps the messages it
    holds unacknowledged when it closes, and skips acknowledgements once it is closed."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, c: Any) -> None:
        channel = getattr(c.task_consumer, "channel", None)
        if channel is None or not hasattr(channel, "qos"):
            return
        channel.qos.restore_at_shutdown = False
        for name in ("basic_ack", "basic_reject"):
            setattr(channel, name, _unless_closed(channel, getattr(channel, name)))


def _unless_closed(channel: Any, method: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if getattr(channel, "closed", False):
            return None  # the connection it was delivered on is gone: nothing to tell
        return method(*args, **kwargs)

    return call


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
    app.steps["consumer"].add(OutliveLostBroker)
    return app


@signals.setup_logging.connect
def _logs(**_: Any) -> None:
    """The worker logs as the API does (config/logs.py), not in Celery's own format."""
    logs.setup(celery_app.conf.tinkerq_settings.log_format, "worker")


celery_app = make_celery(load_settings())
