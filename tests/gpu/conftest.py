"""GPU tests: collected only where CUDA is there, and run in a process of their own with
Triton's interpreter off (the CPU suite turns it on for its kernel tests):

    TRITON_INTERPRET=0 python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import os

import pytest
import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _real_triton():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("run the GPU tests with TRITON_INTERPRET=0 (see tests/gpu/conftest.py)")
