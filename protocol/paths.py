"""tinker:// paths and the ids the SDK derives: runs, samplers, checkpoints.

    tinker://<run>/weights/<name>           a training checkpoint (adapter + optimizer)
    tinker://<run>/sampler_weights/<name>   sampler weights (the peft adapter)

Run ids are "{session}:train:{n}" and sampler ids "{session}:sample:{n}": the SDK derives
the first itself on the create-via-load path (protocol note §5.2).
"""

from __future__ import annotations

from typing import Any

from protocol.errors import bad

SEGMENTS = {"weights": "training", "sampler_weights": "sampler"}  # segment -> checkpoint kind


def model_id(session_id: str, n: int) -> str:
    return f"{session_id}:train:{n}"


def sampler_id(session_id: str, n: int) -> str:
    return f"{session_id}:sample:{n}"


def checkpoint_path(run_id: str, segment: str, name: str) -> str:
    return f"tinker://{run_id}/{segment}/{name}"


def parse_tinker_path(path: Any) -> tuple[str, str, str]:
    """tinker://<run>/<weights|sampler_weights>/<name> -> (run, checkpoint kind, name)."""
    parts = path.removeprefix("tinker://").split("/") if isinstance(path, str) else []
    if not (isinstance(path, str) and path.startswith("tinker://")) or len(parts) != 3:
        raise bad(f"path {path!r} is not a tinker://<run>/<weights|sampler_weights>/<name> path")
    if parts[1] not in SEGMENTS:
        raise bad(f"path {path!r}: segment {parts[1]!r} must be one of {sorted(SEGMENTS)}")
    return parts[0], SEGMENTS[parts[1]], parts[2]
