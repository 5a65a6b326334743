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
the contract allows. So does ``selector.gqa="head"`` (each query head its own selection, ``Selection.head_mask``):
``quest_page_scores`` and ``top_p_attend`` compute a kv-head's group at once, so selection, pruning and attention
run the torch reference there; the int4 estimate (every query head's scores) stays in C++.

Built just in time with the host's C++ compiler on first use (``load()``, cached by torch); a machine that cannot
build it raises ``BackendUnavailableError`` saying why (``backend="auto"`` then warns once and uses ``torch``).

The four are registered torch operators, ``torch.ops.twilight_cpu.<name>`` (the schemas, with what each writes in
place, in the C++; their fake implementations here), so ``torch.compile`` captures them without a graph break.
"""
from __future__ import annotations

import functools

import torch

from twilight import _tensors as checks
from twilight.contract import BackendUnavailableError
from twilight.kernels.reference import TorchBackend
from twilight.selection import Selection

__all__ = ["CpuBackend", "load"]

SOURCES = ("cpu_decode.cpp",)


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """The operators ``torch.ops.twilight_cpu`` (their namespace): the library is built on first call with the host
    compiler (cached by torch, rebuilt when a file of csrc/ changes), loaded, and the operators' fake
    implementations registered, so that ``torch.compile`` traces them."""
    from torch.utils.cpp_extension import load as load_extension

    from twilight.kernels.jit import CSRC_DIR, source_hash_flag, sources

    try:  # a plain shared library (no Python module): its TORCH_LIBRARY block registers the operators
        load_extension(name="twilight_cpu_kernels", sources=sources(SOURCES), verbose=verbose,
                       is_python_module=False,
                       extra_cflags=["-O3", "-march=native", "-fno-trapping-math", source_hash_flag()])
    except (RuntimeError, OSError, ImportError) as err:
        raise BackendUnavailableError(f"building the cpu kernels from {CSRC_DIR} failed: {err}") from err
    _register_fakes()
    return torch.ops.twilight_cpu


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Each operator's outputs (shapes, dtypes, devices) without running it, as the C++ makes them (once)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED = True
    register = torch.library.register_fake

    @register("twilight_cpu::update_token")
    def _update_token(k, k_int4, k_qparams, page_bounds, start, pos, page_size, block):
        torch._check(k.dtype == torch.float32, lambda: "update_token: k must be contiguous float32")
        return None  # writes k_int4, k_qparams and page_bounds in place

    @register("twilight_cpu::quest_page_scores")
    def _quest_page_scores(q, bounds, start, n_pages, page_size, length):
        torch._check(q.dtype == torch.float32, lambda: "quest_page_scores: q must be contiguous float32")
        torch._check(bounds.dim() == 5, lambda: "quest_page_scores: bounds must be contiguous [B, H, P, 2, D]")
        torch._check(bounds.dtype in (torch.float32, torch.bfloat16),
                     lambda: "quest_page_scores: bounds must be float32 or bfloat16")
        torch._check(start.dtype == torch.int32, lambda: "quest_page_scores: start must be int32")
        return q.new_empty((bounds.shape[0], bounds.shape[1], n_pages))  # [B, H, n_pages] float32

    @register("twilight_cpu::int4_scores")
    def _int4_scores(q, packed, qparams, cand, counts, block):
        torch._check(q.dtype == torch.float32, lambda: "int4_scores: q must be contiguous float32")
        torch._check(packed.dtype == torch.uint8, lambda: "int4_scores: packed must be uint8")
        torch._check(cand.dtype == torch.int32 and counts.dtype == torch.int32,
                     lambda: "int4_scores: cand and counts must be int32")
        H = packed.shape[1]
        return q.new_empty((packed.shape[0], H * (q.shape[1] // H), cand.shape[2]))  # [B, Hq, K] float32

    @register("twilight_cpu::top_p_attend")
    def _top_p_attend(scores, cand, counts, p, scale, q, k, v, kept_width=None):
        torch._check(scores.dtype == torch.float32, lambda: "scores must be contiguous float32")
        B, Hq, H = scores.shape[0], scores.shape[1], cand.shape[1]
        # the widest row's union (at least 1), unless the caller fixes the width
        width = torch.library.get_ctx().new_dynamic_size(min=1) if kept_width is None else kept_width
        return (q.new_empty((B, Hq, k.shape[3])), counts.new_empty((B, Hq)), counts.new_empty((B, H, width)),
                counts.new_empty((B, H)))


def _fp32_cpu(q: torch.Tensor, cache) -> bool:
    return q.dtype == torch.float32 and cache.dtype == torch.float32 and q.device.type == "cpu"


def _quest(backend, selector, q: torch.Tensor, cache, plan) -> Selection:
    """Quest's own selection with the C++ page scores (``CpuBackend.quest_page_scores``: float32 only, else torch)."""
    return selector(q, cache, plan, page_scores=backend.quest_page_scores)


class CpuBackend(TorchBackend):
    """Torch's control flow; Quest's page scores, the int4 estimate, the token update and top-p + union +
    attention in C++."""

    name = "cpu"
    select_kernels = {"quest": _quest}

    def __init__(self) -> None:
        self._ops = ops = load()  # build now, so that a missing compiler shows up when the backend is chosen
        # the operators' overloads, bound once: a call skips the overload resolution of torch.ops.<ns>.<name>
        self._update_token = ops.update_token.default
        self._quest_page_scores = ops.quest_page_scores.default
        self._int4_scores = ops.int4_scores.default
        self._top_p_attend = ops.top_p_attend.default

    def quest_page_scores(self, q, cache):
        if not _fp32_cpu(q, cache) or cache.bounds_dtype not in (torch.float32, torch.bfloat16):
            return super().quest_page_scores(q, cache)
        checks.check_q(q, cache)
        cache.update_derived()
        return self._quest_page_scores(q.contiguous(), cache.page_bounds, cache.start, cache.num_pages,
                                       cache.page_size, cache.length)

    def estimate(self, q, cache, sel, kind, plan):
        if (kind != "int4" or cache.quant_bits != 4 or not _fp32_cpu(q, cache) or q.shape[1] > 64 * cache.num_kv_heads):
            return super().estimate(q, cache, sel, kind, plan)
        checks.check_q(q, cache)
        checks.check_selection(sel, cache)
        cache.update_derived()
        return self._int4_scores(q.contiguous(), cache.k_int4, cache.k_qparams, sel.indices.contiguous(),
                                 sel.counts.contiguous(), cache.int4_block)

    def token_updater(self, cache):
        if (cache.dtype != torch.float32 or cache.quant_bits not in (None, 4) or cache.label_channels is not None
                or (cache.keep_page_bounds and cache.bounds_dtype not in (torch.float32, torch.bfloat16))):
            return None
        update_token = self._update_token

        def update(c, pos: int) -> None:
            quant = c.quant_bits == 4
            update_token(c.k, c.k_int4 if quant else None, c.k_qparams if quant else None,
                         c.page_bounds if c.keep_page_bounds else None, c.start, pos, c.page_size, c.int4_block)

        return update

    def prune_attend(self, q, cache, sel, estimator, pruner, scale, plan):
        if (sel.head_mask is not None  # gqa="head": top_p_attend shares a row between a group's query heads
                or pruner.type != "top_p" or isinstance(pruner.p, torch.Tensor) or q.dtype != torch.float32
                or cache.dtype != torch.float32 or q.device.type != "cpu" or not (plan.host_reads or plan.traced)):
            return super().prune_attend(q, cache, sel, estimator, pruner, scale, plan)
        scores = self.estimate(q, cache, sel, estimator.type, plan)  # [B, Hq, K] raw q·k
        # A traced step fixes the kept positions' width at the candidates' (a shape that depends on no count).
        out, q_counts, kept, kv_counts = self._top_p_attend(
            scores.contiguous(), sel.indices, sel.counts, float(pruner.p), float(scale), q.contiguous(),
            cache.k, cache.v, sel.k_max if plan.traced else None)
        return out, Selection(kept, kv_counts), q_counts
