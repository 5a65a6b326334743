"""The ``cpu`` backend: the decode step's stages fused in C++ (``csrc/cpu_decode.cpp``).

On a CPU, the torch reference spends most of a sparse layer's time issuing ~150 small tensor ops (each costs
tens of microseconds of dispatch, whatever its size), and its int4 GEMV and Quest matmul read more bytes than
the step needs. This backend keeps the torch reference's control flow (the Quest selector's page choice, the
contract's stages) and runs the heavy parts as compiled calls:

- ``update_token``: a decode token's int4 codes, scale and mid, and Quest page bounds, in place;
- ``quest_page_scores``: Quest's page upper bounds in one pass over the bounds (float32, or bf16 when the
  pipeline asks for them), the same float32 products as the torch reference;
- ``int4_scores``: the candidates' estimated ``q·k`` from the packed int4 keys, reading only the candidates'
  bytes (eight page-aligned tokens at a time), in float32 (no bf16 rounding of ``q`` or the scales, unlike
  PyTorch's int4 GEMV);
- ``top_p_attend``: each query head's exact top-p over its kv-head's candidates, the group's union, and the
  attention over the union, per (batch, kv-head) row.

Float32 caches and queries only (the CPU's dtype); other dtypes and pruners run the torch reference's code, as
the contract allows. Built just in time with the host's C++ compiler on first use (``load()``, cached by
torch); a machine that cannot build it raises ``BackendUnavailableError`` saying why (``backend="auto"`` then
warns once and uses ``torch``).
"""
from __future__ import annotations

import functools

import torch

from twilight import _tensors as checks
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


def _fp32_cpu(q: torch.Tensor, cache) -> bool:
    return q.dtype == torch.float32 and cache.dtype == torch.float32 and q.device.type == "cpu"


class CpuBackend(TorchBackend):
    """Torch's control flow; Quest's page scores, the int4 estimate, the token update and top-p + union +
    attention in C++."""

    name = "cpu"

    def __init__(self) -> None:
        self._ops = load()  # build now, so that a missing compiler shows up when the backend is chosen

    def select(self, q, cache, selector, plan):
        if getattr(selector, "kind", None) == "quest" and _fp32_cpu(q, cache):
            return selector(q, cache, plan, page_scores=self.quest_page_scores)
        return selector(q, cache, plan)

    def quest_page_scores(self, q, cache):
        if not _fp32_cpu(q, cache) or cache.bounds_dtype not in (torch.float32, torch.bfloat16):
            return super().quest_page_scores(q, cache)
        checks.check_q(q, cache)
        cache.update_derived()
        return self._ops.quest_page_scores(q.contiguous(), cache.page_bounds, cache.start, cache.num_pages,
                                           cache.page_size, cache.length)

    def estimate(self, q, cache, sel, kind, plan=None):
        if (kind != "int4" or cache.quant_bits != 4 or not _fp32_cpu(q, cache) or q.shape[1] > 64 * cache.num_kv_heads):
            return super().estimate(q, cache, sel, kind, plan)
        checks.check_q(q, cache)
        checks.check_selection(sel, cache)
        cache.update_derived()
        return self._ops.int4_scores(q.contiguous(), cache.k_int4, cache.k_qparams, sel.indices.contiguous(),
                                     sel.counts.contiguous(), cache.int4_block)

    def token_updater(self, cache):
        if (cache.dtype != torch.float32 or cache.quant_bits not in (None, 4) or cache.label_channels is not None
                or (cache.keep_page_bounds and cache.bounds_dtype not in (torch.float32, torch.bfloat16))):
            return None
        ops = self._ops

        def update(c, pos: int) -> None:
            empty = _empty(c.device)
            ops.update_token(c.k, c.k_int4 if c.quant_bits == 4 else empty,
                             c.k_qparams if c.quant_bits == 4 else empty,
                             c.page_bounds if c.keep_page_bounds else empty, c.start, pos, c.page_size,
                             c.int4_block)

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
