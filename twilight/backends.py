"""Backends: the registry of who runs each stage's arithmetic.

What a backend implements is ``twilight.contract.Backend`` (prune, attend, their primitives and fused selection
kernels); ``torch`` (``twilight.kernels.reference.TorchBackend``) runs anywhere and is the reference. ``cpu``,
``triton``, ``cuda`` and ``flashinfer`` (``twilight.kernels``) subclass it and override what they accelerate. This
module only lists them: kernel modules import the contract, never this registry, and are imported here when first
built.
``resolve_backend("auto", device)`` picks the fastest available one for the device; naming an unavailable
backend raises ``BackendUnavailableError`` saying why.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import torch

from twilight.config import BACKENDS
from twilight.contract import Backend, BackendUnavailableError
from twilight.kernels.reference import TorchBackend

__all__ = ["Backend", "BackendUnavailableError", "TorchBackend", "available_backends", "resolve_backend"]


def _why_cpu_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors (got {device.type})"
    return None


def _why_triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install 'twilight[gpu]')"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA device (got {device.type}) or TRITON_INTERPRET=1 for the CPU interpreter"


def _why_cuda_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return (f"the cuda backend needs a CUDA device (got {device.type}; "
                f"torch.cuda.is_available()={torch.cuda.is_available()})")
    return None


def _why_flashinfer_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("flashinfer") is None:
        return "the 'flashinfer' package is not installed (pip install flashinfer-python)"
    if device.type != "cuda":
        return f"FlashInfer kernels need a CUDA device (got {device.type})"
    return None


# Each factory imports its kernel module when the backend is built, so importing twilight imports none of
# Triton, the CUDA extension or FlashInfer.
def _cpu_factory():
    from twilight.kernels.cpu import CpuBackend

    return CpuBackend()


def _triton_factory():
    from twilight.kernels.triton import TritonBackend

    return TritonBackend()


def _cuda_factory():
    from twilight.kernels.cuda import CudaBackend

    return CudaBackend()


def _flashinfer_factory():
    from twilight.kernels.flashinfer import FlashInferBackend

    return FlashInferBackend()


# name -> (why-unavailable check, factory): every backend is listed here; kernel modules register nothing.
_REGISTRY: dict[str, tuple[Callable[[torch.device], str | None], Callable[[], object]]] = {
    "torch": (lambda device: None, TorchBackend),
    "cpu": (_why_cpu_unavailable, _cpu_factory),
    "triton": (_why_triton_unavailable, _triton_factory),
    "cuda": (_why_cuda_unavailable, _cuda_factory),
    "flashinfer": (_why_flashinfer_unavailable, _flashinfer_factory),
}
# Fastest first, for "auto" on a CUDA device. Triton leads: it covers all four stages with fused Quest selection
# and top-p -> compacted selection and needs no host synchronisation; cuda adds two hand-written kernels (and a
# JIT build on first use); flashinfer plans its paged decode on the host every step.
_AUTO_ORDER_CUDA = ("triton", "cuda", "flashinfer", "torch")
# On the CPU: the fused C++ kernels (built just in time with the host compiler), else the torch reference.
_AUTO_ORDER_CPU = ("cpu", "torch")
_AUTO_SKIP_WARNED: set[str] = set()


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """``{name: None if available else the reason}`` for every backend on ``device``."""
    device = torch.device(device)
    return {name: check(device) for name, (check, _) in _REGISTRY.items()}


def resolve_backend(name: str, device: torch.device | str):
    """The backend object for ``name`` on ``device`` (``auto``: the fastest available)."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: must be one of {', '.join(BACKENDS)}")
    if name == "auto":
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else _AUTO_ORDER_CPU if device.type == "cpu" else ()
        for candidate in order:
            check, factory = _REGISTRY[candidate]
            if check(device) is None:
                try:
                    return factory()
                except (ImportError, RuntimeError, OSError) as err:  # e.g. a JIT build failing: try the next one
                    if candidate not in _AUTO_SKIP_WARNED:
                        _AUTO_SKIP_WARNED.add(candidate)
                        warnings.warn(f"backend='auto' skips {candidate!r}, which failed to load: "
                                      f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
                    continue
        return TorchBackend()
    check, factory = _REGISTRY[name]
    why = check(device)
    if why is not None:
        raise BackendUnavailableError(f"backend={name!r} is not available: {why}")
    return factory()
