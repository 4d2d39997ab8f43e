"""The result doorbell: a task rings it after storing a result; long-polls wait on it.

One Redis channel for all results. Each process runs one listener thread subscribed to it
and wakes the `threading.Event`s registered for the rung request id. Under gunicorn+gevent
`threading` is monkey-patched, so thousands of waiting polls cost one Redis connection.

A waiter must be registered before the caller re-checks the database (`listen()`), or a
ring that lands between the check and the registration is lost. Wake-ups may be spurious
(after a reconnect every waiter is woken, since rings may have been missed): callers always
re-check the database after waking.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import redis

log = logging.getLogger(__name__)

CHANNEL = "tinkerq:results"


def sampler_bell(sampler_id: str) -> str:
    """What rings, besides its request id, when a sample of this session is answered
    (retrieve_futures waits on it)."""
    return f"sampler:{sampler_id}"


class Doorbell:
    def __init__(self, redis_url: str, channel: str = CHANNEL):
        self.channel = channel
        self._redis = redis.Redis.from_url(redis_url)
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._stopped = threading.Event()

    def ring(self, request_id: str) -> bool:
        """Announce that `request_id` has its result stored (call after the commit). Best
        effort: with Redis away the ring is lost (False), and a waiting poll finds the result
        when its window ends or its listener reconnects (which wakes every waiter)."""
        try:
            self._redis.publish(self.channel, request_id)
        except redis.RedisError as e:
            log.warning("could not ring %s: Redis is away (%s)", request_id, e)
            return False
        return True

    @contextlib.contextmanager
    def listen(self, request_id: str) -> Iterator[threading.Event]:
        """An Event set when `request_id` rings; registered for the `with` block."""
        self._ensure_listener()
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(request_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiters.get(request_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[request_id]

    def wait(self, request_id: str, timeout: float) -> bool:
        """Block until `request_id` rings or `timeout` passes; True if it rang."""
        with self.listen(request_id) as event:
            return event.wait(timeout)

    def close(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.join(timeout=5)

    # --- the listener thread --------------------------------------------------------------

    def _ensure_listener(self) -> None:
        # Started lazily so that it lives in the (post-fork) process that waits.
        with self._lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(
                    target=self._run, name="doorbell-listener", daemon=True
                )
                self._listener.start()

    def _wake(self, request_id: str | None) -> None:
        with self._lock:
            if request_id is None:
                events = [e for group in self._waiters.values() for e in group]
            else:
                events = list(self._waiters.get(request_id, ()))
        for event in events:
            event.set()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopped.is_set():
            try:
                self._listen_once()
                backoff = 0.1
            except Exception as e:  # noqa: BLE001 - any Redis failure means reconnect
                log.warning("doorbell listener lost Redis (%s); reconnecting", e)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _listen_once(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            pubsub.subscribe(self.channel)
            while not self._stopped.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    self._wake(None)  # rings before this point were missed: re-check all
                elif message["type"] == "message":
                    data = message["data"]
                    self._wake(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            pubsub.close()
