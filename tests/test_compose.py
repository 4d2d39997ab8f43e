"""docker/compose.yaml as docker compose reads it (`config`, with the compose that this
machine's docker client has: the plugin or docker-compose), and the Grafana dashboard beside
it, whose queries name only metrics that the API and the worker export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True
                                 ).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, "no docker compose here: .ci/run installs docker-compose (apt)"
    return [legacy]


def test_compose_config_passes_and_says_what_it_should():
    done = subprocess.run([*compose(), "-f", str(DOCKER / "compose.yaml"), "config"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"postgres", "redis", "api", "worker", "flower", "prometheus", "grafana"} <= set(
        services)
    for name in ("postgres", "redis", "api", "worker", "worker-qwen3-4b", "flower"):
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_dashboard_queries_exported_metrics():
    from prometheus_client import REGISTRY

    import app.metrics  # noqa: F401 - registers the API's metrics
    import workers.metrics  # noqa: F401 - and the worker's

    exported = {family.name for family in REGISTRY.collect()}
    # read at scrape time (no fixed registration): the names their collectors yield
    source = (Path(app.metrics.__file__).read_text() + Path(workers.metrics.__file__)
              .read_text())
    exported |= set(re.findall(r'GaugeMetricFamily\(\s*"(tinkerq_\w+)"', source))
    dashboard = json.loads((DOCKER / "grafana" / "tinkerq.json").read_text())
    queried = {re.sub(r"_(bucket|count|sum|total)$", "", name)
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"tinkerq_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported
