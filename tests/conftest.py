"""Test setup shared by every test module.

The Triton interpreter must be switched on before ``triton`` is imported anywhere, so this happens
first, before any snap_fast import: on a machine without a GPU the kernels then run (slowly, on
small shapes) on the CPU, which is how CI tests them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test may reach a hub: models are built from configs, data is local or shipped.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _fast_interpreted_sort():
    """Let the interpreter evaluate tl.sort's xor reductions with numpy instead of per element.

    ``tl.sort`` finds each element's compare-and-swap partner with an xor reduction over a
    size-2 axis; the interpreter runs any reduction with a custom combine function as a Python
    loop over elements (seconds per 1000-element sort). ``np.bitwise_xor.reduce`` computes the
    same values, so the kernels under test are unchanged; only the emulation gets faster.
    Nothing to do when the kernels are compiled for a GPU.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no triton on this platform: the kernel tests skip themselves
        yield
        return

    original = interpreter.ReduceOps.apply_impl

    def apply_impl(self, inputs):
        if self.combine_fn == tl.standard._xor_combine and len(inputs) == 1 and self.axis is not None:
            data = np.bitwise_xor.reduce(inputs[0].handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, inputs[0].dtype)
        return original(self, inputs)

    interpreter.ReduceOps.apply_impl = apply_impl
    try:
        yield
    finally:
        interpreter.ReduceOps.apply_impl = original


