"""Keep the GPU worker running where nothing else restarts it (`honcho start` does not):

    python -m workers.supervise [python -m workers flags]

runs `python -m workers` with the same arguments as a child process and starts it again
whenever it ends other than by being asked to (a crash, SIGKILL, the kernel's out-of-memory
killer, exit status 70 after a lost GPU): the new process takes back the calls the dead one
held and rebuilds its training runs from their snapshots (docs/design.md, Reliability).
SIGTERM or SIGINT is passed on to the worker, which shuts down warm, and ends this process.
A worker that keeps dying is restarted after a growing pause (up to 30 s).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger("tinkerq.supervise")
STABLE_S = 60.0  # a worker that lived this long died by accident: restart at once


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervise] "
                                                   "%(message)s")
    state: dict[str, Any] = {"stopping": False, "child": None}

    def forward(signum: int, _frame: Any) -> None:
        state["stopping"] = True
        if state["child"] is not None:
            state["child"].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    pause = 0.0
    while True:
        started = time.monotonic()
        state["child"] = subprocess.Popen([sys.executable, "-m", "workers", *argv])
        code = state["child"].wait()
        if state["stopping"] or code == 0:
            return code
        pause = 0.0 if time.monotonic() - started > STABLE_S else min(30.0, 2 * pause or 1.0)
        log.warning("the worker ended with status %s; starting it again in %.0f s", code, pause)
        time.sleep(pause)
        if state["stopping"]:
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
