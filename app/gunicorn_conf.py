"""gunicorn settings for the API: one gevent worker holds thousands of long-polls.

Each in-flight `retrieve_future` is one HTTP/1.1 connection parked on the Redis doorbell
(a greenlet, no thread, no database connection), so one process with a large
worker_connections serves them all. Address from TINKERQ_HOST (default 127.0.0.1) and port
from TINKERQ_PORT (default 8000). While api_keys=open (any `tml-` key is accepted) gunicorn
refuses to start on an address beyond loopback (`on_starting`); the container image sets
0.0.0.0 and api_keys=keys.
"""

import json
import logging
import os
import tempfile
from pathlib import Path

from gunicorn import util

from app.keys import check_bind
from config import Settings, SettingsError, load_settings, logs


def _json_error(sock, status_int, reason, mesg):
    """gunicorn's own answers (414 URI too long, 431 headers too large, 400 a request it
    cannot parse) in the API's JSON shape: the SDK reads an HTML 4xx as a proxy's."""
    body = json.dumps({"detail": f"{reason}: {mesg}" if mesg else reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin1") + body)


util.write_error = _json_error  # what gunicorn's workers call for errors they answer themselves

bind = f"{os.environ.get('TINKERQ_HOST', '127.0.0.1')}:{os.environ.get('TINKERQ_PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("TINKERQ_WEB_WORKERS", "1"))
worker_connections = 10000
timeout = 120  # above the 25 s long-poll window; gevent workers heartbeat independently
keepalive = 75  # the SDK keeps connections alive between polls
accesslog = os.environ.get("TINKERQ_ACCESS_LOG")  # e.g. "-" for stdout

def check_binds(binds: list[str]) -> Settings:
    """Refuse every address beyond loopback while api_keys=open (`-b` flags included, as
    gunicorn merged them into cfg.bind); returns the settings."""
    try:
        settings = load_settings()
        for address in binds:
            parsed = util.parse_address(address)
            if isinstance(parsed, tuple):  # else a unix socket, or a socket systemd passed on
                check_bind(parsed[0], settings)
    except SettingsError as e:
        raise RuntimeError(str(e)) from e  # gunicorn prints a RuntimeError's text and exits 1
    return settings


def on_starting(server):
    """In the master, before binding and forking: the bind check, the logs, and the folder
    of /metrics (app/metrics.py) in prometheus_client's multiprocess mode, where each worker
    process counts into files that a scrape of any of them sums."""
    settings = check_binds(server.cfg.bind)
    logs.setup(settings.log_format, "web")  # the workers fork from here with it
    if settings.log_format == "json":  # gunicorn's own lines as JSON too
        for name in ("gunicorn.error", "gunicorn.access"):
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        for stale in Path(folder).glob("*.db"):
            stale.unlink()  # counts of an earlier run of the API: the counters start again
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tinkerq-metrics-")


def child_exit(server, worker):
    """A worker process exited: its live gauges (long-polls parked) leave the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
