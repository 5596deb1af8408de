"""Test setup: runs on CPU-only machines. Triton kernels need the interpreter there, and it
must be switched on before guard_fast.kernels is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
