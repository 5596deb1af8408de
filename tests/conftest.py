"""Test setup: runs on CPU-only machines. Triton kernels need the interpreter there, and it
must be switched on before guard_fast.kernels is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module: several threads per process oversubscribe the
    small shared CI machine (and these modules' timings then swing by 10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
