"""The ``cpu`` backend: the decode step's small-op stages fused in C++ (``csrc/cpu_decode.cpp``).

On a CPU, the torch reference spends most of a sparse layer's time issuing ~150 small tensor ops (each costs
tens of microseconds of dispatch, whatever its size). This backend keeps the torch reference's selection and
int4 estimate (PyTorch's own GEMV and matmuls) and replaces the rest with two compiled calls:

- ``update_token``: a decode token's int4 codes, scale and mid, and Quest page bounds, in place;
- ``top_p_attend``: each query head's exact top-p over its kv-head's candidates, the group's union, and the
  attention over the union, per (batch, kv-head) row.

Float32 caches only (the CPU's dtype); other dtypes and pruners run the torch reference's code, as the contract
allows. Built just in time with the host's C++ compiler on first use (``load()``, cached by torch); a machine
that cannot build it raises ``BackendUnavailableError`` saying why (``backend="auto"`` then warns once and uses
``torch``).
"""
from __future__ import annotations

import functools

import torch

from twilight.contract import BackendUnavailableError, TorchBackend
from twilight.selection import Selection

__all__ = ["CpuBackend", "load"]

SOURCES = ("cpu_decode.cpp",)


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """The compiled extension (built on first call with the host compiler; cached by torch)."""
    from torch.utils.cpp_extension import load as load_extension

    from twilight.kernels.cuda import CSRC_DIR, _source_hash_flag, _sources

    try:
        return load_extension(name="twilight_cpu_kernels", sources=_sources(SOURCES), verbose=verbose,
                              extra_cflags=["-O3", "-march=native", "-fno-trapping-math", _source_hash_flag()])
    except (RuntimeError, OSError, ImportError) as err:
        raise BackendUnavailableError(f"building the cpu kernels from {CSRC_DIR} failed: {err}") from err


_EMPTY: dict[torch.device, torch.Tensor] = {}


def _empty(device) -> torch.Tensor:
    if device not in _EMPTY:
        _EMPTY[device] = torch.empty(0, device=device)
    return _EMPTY[device]


class CpuBackend(TorchBackend):
    """Torch's selection and int4 estimate; the token update and top-p + union + attention in C++."""

    name = "cpu"

    def __init__(self) -> None:
        self._ops = load()  # build now, so that a missing compiler shows up when the backend is chosen

    def token_updater(self, cache):
        if (cache.dtype != torch.float32 or cache.quant_bits not in (None, 4) or cache.label_channels is not None
                or (cache.keep_page_bounds and cache.bounds_dtype not in (torch.float32, torch.bfloat16))):
            return None
        ops = self._ops

        def update(c, pos: int) -> None:
            empty = _empty(c.device)
            ops.update_token(c.k, c.k_int4 if c.quant_bits == 4 else empty,
                             c.k_qparams if c.quant_bits == 4 else empty,
                             c.page_bounds if c.keep_page_bounds else empty, pos, c.page_size, c.int4_block)

        return update

    def prune_attend(self, q, cache, sel, config, scale, plan):
        pruner = config.pruner
        if (pruner.type != "top_p" or isinstance(pruner.p, torch.Tensor) or q.dtype != torch.float32
                or cache.dtype != torch.float32 or q.device.type != "cpu" or not plan.host_reads):
            return super().prune_attend(q, cache, sel, config, scale, plan)
        scores = self.estimate(q, cache, sel, config.estimator.type, plan)  # [B, Hq, K] raw q·k
        out, q_counts, kept, kv_counts = self._ops.top_p_attend(
            scores.contiguous(), sel.indices, sel.counts, float(pruner.p), float(scale), q.contiguous(),
            cache.k, cache.v)
        return out, Selection(kept, kv_counts), q_counts
