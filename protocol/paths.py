"""tinker:// paths and the ids the SDK derives: runs, samplers, checkpoints.

    tinker://<run>/weights/<name>           a training checkpoint (adapter + optimizer)
    tinker://<run>/sampler_weights/<name>   sampler weights (the peft adapter)
    tinker://<run>/external_weights/<name>  the peft adapter for download, its files
                                            optionally age-encrypted (save_weights_external)

Run ids are "{session}:train:{n}" and sampler ids "{session}:sample:{n}": the SDK derives
the first itself on the create-via-load path (protocol note §5.2).
"""

from __future__ import annotations

import re
from typing import Any

from protocol.errors import bad

# segment -> checkpoint kind, and back
SEGMENTS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
SEGMENT_OF = {kind: segment for segment, kind in SEGMENTS.items()}
# A checkpoint name is a folder of its own below its run's segment: never ".", "..", a
# hidden name, a separator or anything a shell or a file system reads specially.
MAX_NAME_LEN = 128
NAME_CHARS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def model_id(session_id: str, n: int) -> str:
    return f"{session_id}:train:{n}"


def sampler_id(session_id: str, n: int) -> str:
    return f"{session_id}:sample:{n}"


def checkpoint_path(run_id: str, segment: str, name: str) -> str:
    return f"tinker://{run_id}/{segment}/{name}"


def check_name(name: Any) -> str:
    """A checkpoint name as given to save_state / save_weights_for_sampler, or read from a
    tinker:// path; raises a 400 naming the value and the rule."""
    if not isinstance(name, str) or not name:
        raise bad(f"checkpoint name (path) {name!r} must be a non-empty string")
    if len(name) > MAX_NAME_LEN:
        raise bad(f"checkpoint name {name[:40]!r}... has {len(name)} characters; "
                  f"limit {MAX_NAME_LEN}")
    if not NAME_CHARS.fullmatch(name):
        raise bad(f"checkpoint name {name[:40]!r} may hold only letters, digits, '_', '-' "
                  "and '.', and must start with a letter, a digit or '_'")
    return name


def parse_tinker_path(path: Any) -> tuple[str, str, str]:
    """tinker://<run>/<segment>/<name> -> (run, checkpoint kind, name)."""
    parts = path.removeprefix("tinker://").split("/") if isinstance(path, str) else []
    if not (isinstance(path, str) and path.startswith("tinker://")) or len(parts) != 3:
        raise bad(f"path {path!r} is not a tinker://<run>/<{'|'.join(SEGMENTS)}>/<name> path")
    if parts[1] not in SEGMENTS:
        raise bad(f"path {path!r}: segment {parts[1]!r} must be one of {sorted(SEGMENTS)}")
    if not parts[0] or "\x00" in parts[0]:
        raise bad(f"path {path[:80]!r} names no valid training run")
    return parts[0], SEGMENTS[parts[1]], check_name(parts[2])
