"""A live tinkerq stack for end-to-end tests: real processes, real Redis, real database.

`Stack.start(tmp, backend)` runs what the Procfile runs (Redis when embedded, gunicorn
with gevent, the Celery GPU worker; with `flower=True` also the Procfile's own `flower` line,
through a shell as honcho runs it) with their own data folder and ports, waits until the
API answers, and `stop()` ends them all. Logs go to files in the data folder and are
printed when a test fails. A stack whose web answered any request with a 500 (an unhandled
error in its log) fails at `stop()`: no 500 is an expected answer anywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from store.engine import normalise_url
from tests.e2e import services

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API_KEY = "tml-e2e-tenant"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM_REDIS = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_command(name: str) -> str:
    """The Procfile's command line for process `name`, read with honcho's own parser."""
    from honcho.environ import parse_procfile

    return parse_procfile((ROOT / "Procfile").read_text()).processes[name]


def _create_postgres_db() -> str:
    import sqlalchemy as sa

    name = f"tinkerq_e2e_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(normalise_url(POSTGRES_ADMIN), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return name


def _drop_postgres_db(name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(normalise_url(POSTGRES_ADMIN), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@dataclass
class Stack:
    data_dir: Path
    # "sqlite" (SQLite + embedded Redis), "postgres" (the machine's Postgres + Redis server) or
    # "private" (a Postgres cluster and a Redis server of the stack's own, which a test may
    # kill and restart like the other processes: tests/e2e/services.py)
    backend: str
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    pg_db: str | None = None
    flower: bool = False
    cluster: Path | None = None  # the private backend's Postgres folder
    ports: dict[str, int] = field(default_factory=dict)  # the private backend's services
    root: Path = ROOT  # the checkout whose code the processes run (a benchmark's baseline)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['TINKERQ_PORT']}"

    @property
    def metrics_url(self) -> str:
        """The first worker's /metrics (a worker added later finds the port taken)."""
        return f"http://127.0.0.1:{self.env['TINKERQ_METRICS_PORT']}/metrics"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.env['FLOWER_PORT']}"

    @classmethod
    def start(cls, data_dir: Path, backend: str, *, flower: bool = False,
              root: Path = ROOT, **settings: str) -> Stack:
        stack = cls(data_dir, backend, flower=flower, root=root)
        stack._configure(settings)
        try:
            stack._launch()
        except BaseException:
            stack.stop()
            raise
        return stack

    def _configure(self, settings: dict[str, str]) -> None:
        queue = f"e2e-{uuid.uuid4().hex[:6]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKERQ_", "TINKER_"))}
        env.pop("DATABASE_URL", None)
        env.pop("REDIS_URL", None)
        env.update(
            TINKERQ_DATA_DIR=str(self.data_dir),
            TINKERQ_PORT=str(free_port()),
            TINKERQ_QUEUE=queue,
            TINKERQ_WORKER_CONCURRENCY="64",
            TINKERQ_METRICS_PORT=str(free_port()),
            PYTHONUNBUFFERED="1",
            TINKER_TELEMETRY="0",
        )
        if self.backend == "postgres":
            self.pg_db = _create_postgres_db()
            env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{self.pg_db}"
            env["REDIS_URL"] = f"{SYSTEM_REDIS}/{1 + int(uuid.uuid4().int % 14)}"
        elif self.backend == "private":
            self.cluster = services.new_cluster()
            self.ports = {"postgres": free_port(), "redis": free_port()}
            env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{self.ports['postgres']}/postgres"
            env["REDIS_URL"] = f"redis://127.0.0.1:{self.ports['redis']}/0"
            self.commands["postgres"] = services.postgres_command(self.cluster,
                                                                  self.ports["postgres"])
            self.commands["redis"] = services.redis_command(self.ports["redis"])
        else:
            env["TINKERQ_EMBEDDED_REDIS_PORT"] = str(free_port())
        env.update({f"TINKERQ_{k.upper()}": str(v) for k, v in settings.items()})
        if self.flower:  # the Procfile's defaults, not the caller's FLOWER_* settings
            env = {k: v for k, v in env.items() if not k.startswith("FLOWER_")}
            env["FLOWER_PORT"] = str(free_port())
            env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` of the Procfile
        self.env = env

    def _spawn(self, name: str, args: list[str]) -> None:
        self.commands[name] = args
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(
            args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.backend == "sqlite":
            self._spawn("redis", [sys.executable, "-m", "tasks.embedded_redis"])
        for name, port in self.ports.items():
            self._spawn(name, self.commands[name])
            services.wait_for_port(port)
        # as the Procfile runs them (`python -m ...`: no console script needs to exist)
        self._spawn("web", [sys.executable, "-m", "gunicorn", "--config", "app/gunicorn_conf.py",
                            "app.factory:create_app()"])
        self._spawn("worker", [sys.executable, "-m", "workers"])
        if self.flower:
            self._spawn("flower", ["/bin/sh", "-c", procfile_command("flower")])
        self._wait_until_ready()

    def add_worker(self, name: str, timeout: float = 120.0, **env: str) -> None:
        """Start one more GPU worker (`python -m workers`) as process `name`, with these
        environment variables over the stack's (its TINKERQ_QUEUE, TINKERQ_BASE_MODEL...),
        and wait until it is ready."""
        own = self.env | env
        self.commands[name] = [sys.executable, "-m", "workers"]
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(
            self.commands[name], cwd=self.root, env=own, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while b" ready." not in (self.data_dir / f"{name}.log").read_bytes():
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready:\n{self.logs()}")
            time.sleep(0.3)

    def _wait_until_ready(
        self, timeout: float = 120.0, log_offset: dict[str, int] | None = None
    ) -> None:
        offset = (log_offset or {}).get("worker", 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.logs()}")
            worker_log = (self.data_dir / "worker.log").read_bytes()[offset:]
            if self._api_answers() and b" ready." in worker_log and self._flower_answers():
                return
            time.sleep(0.3)
        raise TimeoutError(f"stack not ready after {timeout} s:\n{self.logs()}")

    def _api_answers(self) -> bool:
        try:
            return httpx.get(self.url + "/api/v1/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _flower_answers(self) -> bool:
        if "flower" not in self.procs:
            return True
        try:
            return httpx.get(self.flower_url + "/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for name in self.procs:
            path = self.data_dir / f"{name}.log"
            text = path.read_bytes()[-tail:].decode(errors="replace") if path.exists() else ""
            parts.append(f"----- {name} -----\n{text}")
        return "\n".join(parts)

    def restart(self, name: str) -> None:
        """Start a process that `kill` stopped, with the same command, and wait until ready."""
        marker = (self.data_dir / f"{name}.log").stat().st_size
        self._spawn(name, self.commands[name])
        if name in self.ports:
            services.wait_for_port(self.ports[name])
        else:
            self._wait_until_ready(log_offset={name: marker})

    def kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 30.0) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        own = [name for name in self.procs if name in self.ports]  # the private backend's
        for name in reversed([name for name in self.procs if name not in own]):
            # gunicorn's quick shutdown: a graceful one waits out the SDK's keep-alive
            # connections (graceful_timeout, 30 s)
            self.kill(name, signal.SIGQUIT if name == "web" else signal.SIGTERM)
        for name in own:  # their data goes with the stack: no clean shutdown to wait for
            self.kill(name, signal.SIGKILL)
        if self.pg_db:
            _drop_postgres_db(self.pg_db)
            self.pg_db = None
        if self.cluster is not None:
            services.remove_cluster(self.cluster)
            self.cluster = None
        web_log = self.data_dir / "web.log"
        text = web_log.read_text(errors="replace") if web_log.exists() else ""
        if "unhandled error" in text:
            at = text.index("unhandled error")
            raise AssertionError(f"the web answered a 500:\n{text[max(0, at - 500):at + 3000]}")
