"""Test setup shared by every test module.

The Triton interpreter must be switched on before ``triton`` is imported anywhere, so this happens
first, before any snap_fast import: on a machine without a GPU the kernels then run (slowly, on
small shapes) on the CPU, which is how CI tests them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
