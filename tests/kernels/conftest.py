"""Kernel tests (tests/kernels): the helper modules on ``sys.path`` whatever pytest's import mode.

Triton kernels run on CPU tensors when ``TRITON_INTERPRET=1`` (CI) and compiled on a GPU otherwise; the CUDA
kernels of ``csrc/`` run under the CPU emulation of ``csrc/cuda_emulation.h`` and, on a GPU, natively. Tests
marked ``gpu`` skip cleanly without a CUDA device (markers: pyproject.toml; the skip: tests/conftest.py). Shared
builders and references: ``kernel_helpers.py``; the GPU compile checks: ``cuda_compile_check.py`` and
``triton_compile_check.py``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
