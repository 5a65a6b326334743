"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration (import) time whether a kernel is compiled or interpreted; so do we.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """True when these kernels were imported under ``TRITON_INTERPRET=1`` (they run on the CPU interpreter)."""
    return _INTERPRETED


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be cast to float32 (exact IEEE products) for data of ``dtype``.

    Always under the interpreter (its bf16 ``tl.dot`` is wrong: numpy has no bf16) and for float32 data (so the
    GPU does not silently round to tf32). fp16/bf16 data on a GPU use the tensor cores natively.
    """
    return interpreting() or dtype == torch.float32


@triton.jit
def dot(a, b, F32: tl.constexpr):
    """``a @ b`` accumulated in float32; ``F32``: cast the operands to float32 first (IEEE products)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def launch_guard(t: torch.Tensor):
    """Context for launching a Triton kernel on ``t``: its CUDA device, or the CPU under the interpreter."""
    from twilight.kernels._validate import device_guard

    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {t.device}); on the CPU set TRITON_INTERPRET=1 "
                         "before importing twilight.kernels.triton")
    return device_guard(t)
