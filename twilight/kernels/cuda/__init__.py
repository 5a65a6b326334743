"""The ``cuda`` backend: hand-written CUDA kernels from ``csrc/``, built just in time.

=====================  ========================================================================================
kernel (csrc/)         what it computes
=====================  ========================================================================================
``top_p.cu``           exact sorting-free top-p threshold per row (radix search, 8 bits per round, one block
                       per row, weights of rows up to 8192 cached in shared memory), its mask; GQA union +
                       compaction into a `Selection`
``int4_spgemv.cu``     estimated ``q·k`` of the candidates from the packed int4 K cache, all query heads of a
                       GQA group per pass, one thread per candidate
=====================  ========================================================================================

The extension is compiled by ``torch.utils.cpp_extension.load`` the first time a CUDA tensor reaches one of
these functions (or ``CudaBackend`` is built), for the current device's architecture; it is cached by torch
afterwards. ``CudaBackend`` overrides ``estimate`` (int4), ``prune_top_p`` and ``prune_to_selection``, and takes
Quest selection and attention from the Triton backend (or torch when Triton is missing).

Without a GPU, ``enable_emulation()`` builds the same kernel sources with ``-DTWILIGHT_CUDA_EMULATE`` against a
small CPU emulation of the CUDA execution model (``csrc/cuda_emulation.h``) and lets these functions take CPU
tensors: that is how the test suite runs the kernels here. It is slow and meant for tests only.
"""
from __future__ import annotations

import functools

import torch

from twilight.contract import BackendUnavailableError
from twilight.kernels._validate import (
    as_float_rows,
    check_int4_cache,
    check_prune_inputs,
    check_q,
    check_selection,
    kernel_p,
)
from twilight.kernels.jit import CSRC_DIR, csrc_dir, source_hash_flag, sources
from twilight.kernels.reference import TorchBackend
from twilight.quant import INT4_TILE
from twilight.selection import Selection

__all__ = ["CudaBackend", "int4_scores", "top_p_mask", "top_p_threshold", "prune_to_selection", "load",
           "load_emulated", "enable_emulation", "csrc_dir", "CSRC_DIR", "GPU_SOURCES"]


GPU_SOURCES = ("top_p.cu", "int4_spgemv.cu", "bindings.cpp")
EMULATED_SOURCES = ("emulated_kernels.cpp", "bindings.cpp")
_EMULATION = False


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """The compiled extension (built on first call with nvcc for the current GPU; cached by torch)."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the cuda backend needs a CUDA device (torch.cuda.is_available() is False)")
    from torch.utils.cpp_extension import CUDA_HOME
    from torch.utils.cpp_extension import load as load_extension

    if CUDA_HOME is None:
        raise BackendUnavailableError("the cuda backend compiles csrc/ with nvcc, which was not found "
                                      "(set CUDA_HOME or put nvcc on PATH)")
    paths = sources(GPU_SOURCES)
    try:
        flag = source_hash_flag()
        return load_extension(name="twilight_cuda_kernels", sources=paths, extra_include_paths=[str(CSRC_DIR)],
                              extra_cflags=["-O3", flag], extra_cuda_cflags=["-O3", "-lineinfo", flag],
                              verbose=verbose)
    except (RuntimeError, OSError) as err:
        raise BackendUnavailableError(f"building the cuda kernels from {CSRC_DIR} failed: {err}") from err


@functools.lru_cache(maxsize=None)
def load_emulated(verbose: bool = False):
    """The same kernels built for the CPU emulation (g++ only; for tests on machines without a GPU)."""
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(name="twilight_cuda_emulated", sources=sources(EMULATED_SOURCES),
                          extra_include_paths=[str(CSRC_DIR)],
                          extra_cflags=["-O1", "-DTWILIGHT_CUDA_EMULATE", source_hash_flag()], verbose=verbose)


def enable_emulation(enabled: bool = True) -> None:
    """Let the functions of this module take CPU tensors, running the kernels under the CPU emulation."""
    global _EMULATION
    _EMULATION = bool(enabled)


def _ops(t: torch.Tensor):
    if t.device.type == "cuda":
        return load()
    if _EMULATION:
        return load_emulated()
    raise ValueError(f"the cuda kernels need CUDA tensors (got {t.device}); for the CPU emulation (tests only) "
                     "call twilight.kernels.cuda.enable_emulation()")


def int4_scores(q: torch.Tensor, cache, sel: Selection) -> torch.Tensor:
    """Approximate ``q·k`` of each query head for its kv-head's candidates, from the int4 K cache.

    Args:
        q: ``[B, Hq, D]`` fp32/fp16/bf16; cache: a ``LayerCache`` with ``quant_bits=4``;
        sel: candidates ``indices [B, Hkv, K_max]`` / ``counts [B, Hkv]`` int32.
    Returns:
        ``[B, Hq, K_max]`` float32 raw dot products, ``-inf`` at slots ``>= counts``
        (the contract of ``twilight.estimate.estimate_scores(..., "int4")``).

    Example::

        >>> est = int4_scores(q, cache, sel)   # all on one GPU
    """
    check_q(q, cache)
    check_selection(sel, cache)
    check_int4_cache(cache)
    return _ops(q).int4_spgemv(q.float().contiguous(), cache.k_int4, cache.k_qparams, sel.indices.contiguous(),
                               sel.counts.contiguous())


def _p_args(p, rows_shape: tuple, device) -> tuple:
    """``(p tensor or None, p_value)`` for the binding: a per-row tensor, or one float for every row."""
    p = kernel_p(p, rows_shape, device)
    return (p, 1.0) if isinstance(p, torch.Tensor) else (None, p)


def top_p_threshold(logits: torch.Tensor, p, scale: float = 1.0):
    """Per-row exact top-p threshold of ``logits * scale``: ``(threshold_bits, row_max, kept)``, each ``[R]``.

    Same encoding as ``twilight.kernels.triton.top_p.top_p_threshold``.
    """
    x = as_float_rows(logits).contiguous()
    thr, rowmax, kept, _ = _ops(x).top_p_threshold(x, *_p_args(p, tuple(logits.shape[:-1]), x.device),
                                                   float(scale), None, 1, False)
    return thr, rowmax, kept


def top_p_mask(logits: torch.Tensor, p, scale: float = 1.0) -> torch.Tensor:
    """Smallest set of each row of ``logits * scale`` holding ``p`` of its softmax mass (sorting-free, exact).

    Args:
        logits: ``[..., N]`` float; ``-inf`` marks non-candidates. p: float in ``(0, 1]`` or a tensor of shape
            ``logits.shape[:-1]`` (its values are not checked on the host: no device read). scale: multiplies the
            logits first.
    Returns:
        ``[..., N]`` bool — ``twilight.prune.top_p_mask(logits * scale, p)`` up to float summation order at exact
        mass ties.

    Example::

        >>> top_p_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda")), 0.8)
        tensor([[ True,  True, False, False]], device='cuda:0')
    """
    x = as_float_rows(logits).contiguous()
    _, _, _, mask = _ops(x).top_p_threshold(x, *_p_args(p, tuple(logits.shape[:-1]), x.device), float(scale),
                                            None, 1, True)
    return mask.reshape(logits.shape)


def prune_to_selection(scores: torch.Tensor, sel: Selection, p, scale: float = 1.0) -> tuple[Selection, torch.Tensor]:
    """Top-p per query head, union over the GQA group, compacted into the pruned `Selection` (no host sync).

    Same contract as ``twilight.kernels.triton.top_p.prune_to_selection``: ``scores [B, Hq, K]`` (only the first
    ``sel.counts`` slots of each row are read), ``sel [B, Hkv, K]``, ``p`` a float or ``[B, Hq]`` tensor, ``scale``
    applied inside. Returns ``(Selection [B, Hkv, K], q_counts [B, Hq] int32)``.
    """
    B, Hq, K, Hkv, G = check_prune_inputs(scores, sel)
    x = as_float_rows(scores).contiguous()
    ops = _ops(x)
    counts = sel.counts.contiguous()
    _, _, kept, mask = ops.top_p_threshold(x, *_p_args(p, (B, Hq), x.device), float(scale), counts.view(-1), G,
                                           True)
    out_idx, out_cnt = ops.union_compact(mask, sel.indices.contiguous(), counts)
    return Selection(out_idx, out_cnt), kept.view(B, Hq)


class CudaBackend(TorchBackend):
    """csrc/ kernels for int4 estimation and top-p pruning; Quest and attention from the Triton backend (torch's
    where Triton is not installed)."""

    name = "cuda"
    compile_devices = ()  # its extension's calls are not registered operators yet

    def __init__(self) -> None:
        if torch.cuda.is_available():
            load()  # build now, so that an unusable toolchain shows up when the backend is chosen
        self._triton = _triton_backend()
        if self._triton is not None:
            self.select_kernels = self._triton.select_kernels

    def int4_block(self, device) -> int:
        return INT4_TILE  # the kernels (and Triton's) address 64-token tiles

    def token_updater(self, cache):
        return None if self._triton is None else self._triton.token_updater(cache)

    def quest_page_scores(self, q, cache):
        if self._triton is None:
            return super().quest_page_scores(q, cache)
        return self._triton.quest_page_scores(q, cache)

    def attend(self, q, cache, sel, scale, plan):
        if self._triton is None:
            return super().attend(q, cache, sel, scale, plan)
        return self._triton.attend(q, cache, sel, scale, plan)

    def estimate(self, q: torch.Tensor, cache, sel, kind: str, plan) -> torch.Tensor:
        if kind == "int4":
            return int4_scores(q, cache, sel)
        return super().estimate(q, cache, sel, kind, plan)

    def prune_top_p(self, logits: torch.Tensor, p) -> torch.Tensor:
        return top_p_mask(logits, p)

    def prune_to_selection(self, scores: torch.Tensor, sel, p, scale: float, plan):
        return prune_to_selection(scores, sel, p, scale)


def _triton_backend():
    """The Triton backend, whose Quest selection and attention this one uses (``None`` without Triton)."""
    try:
        from twilight.kernels.triton import TritonBackend
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        return None
    return TritonBackend()
