"""Kernel tests run the real Triton kernels on a GPU, and under Triton's interpreter on CPU machines."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")
