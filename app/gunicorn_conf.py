"""gunicorn settings for the API: one gevent worker holds thousands of long-polls.

Each in-flight `retrieve_future` is one HTTP/1.1 connection parked on the Redis doorbell
(a greenlet, no thread, no database connection), so one process with a large
worker_connections serves them all. Address from TINKERQ_HOST (default 127.0.0.1: any `tml-`
key is accepted, so the API answers this machine only until it is put behind a gateway; the
container image sets 0.0.0.0) and port from TINKERQ_PORT (default 8000).
"""

import json
import os

from gunicorn import util


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
