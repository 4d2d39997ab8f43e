"""The Celery side of tinkerq: the app (`celery -A tasks ...`) and the Tinker-call tasks.

Importing this package builds the Celery app from the environment's settings and
registers the tasks; it loads no torch. The engine (workers/) is imported only inside the
GPU worker process, when its first task runs or when the worker becomes ready.

    celery -A tasks worker -Q gpu-0 -P threads -c 256 -E    # the GPU worker
    celery -A tasks flower                                   # monitoring
"""

from tasks import tinker  # noqa: F401  (registers the tasks on celery_app)
from tasks.celery_app import celery_app

app = celery_app  # the name `celery -A tasks` looks for
