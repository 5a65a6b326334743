"""Kernel tests (tests/kernels): markers, and the helpers module on ``sys.path`` whatever pytest's import mode.

Triton kernels run on CPU tensors when ``TRITON_INTERPRET=1`` (CI) and compiled on a GPU otherwise; the CUDA
kernels of ``csrc/`` run under the CPU emulation of ``csrc/cuda_emulation.h`` and, on a GPU, natively. Tests
marked ``gpu`` skip cleanly without a CUDA device. Shared builders and references: ``kernel_helpers.py``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped when torch.cuda.is_available() is false)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
