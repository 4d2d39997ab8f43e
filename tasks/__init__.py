"""The Celery side of tinkerq: the app (`celery -A tasks ...`) and the Tinker-call tasks.

Importing this package builds the Celery app from the environment's settings and
registers the tasks; it loads no torch. The engine (workers/) is imported only inside the
GPU worker process, when its first task runs or when the worker becomes ready.

    celery -A tasks worker -Q gpu-0 -P threads -c 256 -E    # the GPU worker
    celery -A tasks flower                                   # monitoring
"""

from config import load_settings
from tasks.celery_factory import make_celery

celery_app = make_celery(load_settings())
app = celery_app  # the name `celery -A tasks` looks for

from tasks import tinker  # noqa: E402,F401  (registers the tasks on celery_app)
