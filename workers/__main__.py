"""Start the GPU worker with engine settings as flags: python -m workers [--flags] [-- celery args].

    python -m workers --base-model /models/Qwen3-4B --max-lora-adapters 16 --max-lora-rank 64

Every setting (`python -m config --help`) is accepted; flags are exported as TINKERQ_*
environment variables so the Celery app, built at import, reads them, then the Celery
worker starts on this worker's queue with a thread pool and task events on (Flower).
"""

from __future__ import annotations

import os
import sys

# Packed micro-batches change length every time: let the CUDA caching allocator grow and
# reuse segments instead of fragmenting (must be set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
from dataclasses import fields

from config import Settings, load_settings
from config.loader import build_parser, env_name


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    ours, celery_extra = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(ours)
    for f in fields(Settings):
        value = getattr(args, f.name)
        if value is not None:
            os.environ[env_name(f.name)] = str(value)
    settings = load_settings()
    from tasks import celery_app  # built now, from the environment set above

    try:
        celery_app.worker_main([
            "worker", "-Q", settings.queue, "-P", "threads", "-c",
            str(settings.worker_concurrency), "-E", "-n", f"{settings.queue}@%h",
            "--without-mingle", "--without-gossip", "-l", "INFO", *celery_extra,
        ])
    finally:
        engine = sys.modules.get("workers.engine")
        if engine is not None and engine.FATAL:  # the GPU was lost: the supervisor restarts
            sys.stderr.write(f"tinkerq worker: exiting, the GPU was lost: {engine.FATAL[0]}\n")
            os._exit(engine.EXIT_GPU_LOST)


if __name__ == "__main__":
    main(sys.argv[1:])
