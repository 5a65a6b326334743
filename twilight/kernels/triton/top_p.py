"""Sorting-free top-p in Triton, and its fusion with the GQA union and compaction into a `Selection`.

Semantics are those of ``twilight.prune.top_p_mask``: with weights ``w = exp(x - max(x))`` (float32), keep every
candidate whose weight is ``>= w*``, where ``w*`` is the largest weight such that the candidates ``>= w*`` hold at
least ``p`` of the row's mass (ties kept; ``p = 1`` keeps every finite candidate, ``-inf`` is never kept).

The threshold is found exactly, without sorting: the bit pattern of a non-negative float32 orders like the float,
so ``w*``'s bit pattern is searched digit by digit from the top. One program per row.

- A row of up to ``_MAX_SINGLE`` candidates stays in registers (one read of the logits): a binary search over
  bits 29..0 (every weight is ``<= 1.0``, bits ``< 2**30``), decided two bits per step from three independent row
  sums, 15 dependent steps.
- A longer row is streamed in chunks: a radix search, 8 bits per pass over the row (4 passes), each building the
  histogram of mass per next digit among the candidates that share the digits found so far (256 bins, in a
  per-row scratch buffer, with atomic adds) and keeping the largest digit whose suffix still reaches ``p`` of the
  mass. Masses are summed in 64-bit fixed point (``2**F`` units with ``F = 63 - N.bit_length()``, so the row's
  weights sum below ``2**63``): integer sums do not depend on the order of the atomics, so the threshold is the
  same on every run. With the max and the mask, 6 passes over the row.

- ``top_p_mask(logits, p, scale=1.0) -> bool [..., N]`` (the backend's ``prune_top_p``).
- ``prune_to_selection(scores, sel, p, scale=1.0) -> (Selection, q_counts)``: top-p per query head over each
  kv-head's candidates, union over the GQA group, compacted straight into the pruned `Selection`.

No wrapper synchronises with the host: output shapes come from the input shapes, ``p`` is passed to the kernel as
a scalar argument (a float) or a pointer (a tensor, whose values are not checked on the host: that would be a
device read; values ``>= 1`` keep every finite candidate).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twilight.kernels._validate import as_float_rows, check_prune_inputs, kernel_p, next_pow2
from twilight.kernels.triton._common import launch_guard
from twilight.selection import Selection

__all__ = ["top_p_mask", "top_p_threshold", "prune_to_selection"]

_MAX_SINGLE = 8192  # longest row searched entirely in registers
_CHUNK = 2048  # chunk of a longer row
_RADIX_BINS = 256  # 8-bit digits: 4 passes over a streamed row
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _pick(thr, shift, m1, m2, m3, target):
    """The next two bits of the threshold: the largest of ``01, 10, 11`` (at ``shift``) whose mass reaches target."""
    return tl.where(m3 >= target, thr | (3 << shift),
                    tl.where(m2 >= target, thr | (2 << shift), tl.where(m1 >= target, thr | (1 << shift), thr)))


@triton.jit
def _search_threshold(w, target):
    """Bit pattern of the largest weight ``w*`` with ``sum(w[w >= w*]) >= target`` (``w`` in registers).

    Two bits per pass: three independent row sums (their latencies overlap), 15 dependent rounds for 30 bits.
    """
    bits = w.to(tl.int32, bitcast=True)
    thr = tl.full([], 0, tl.int32)
    for i in range(15):
        shift = 28 - 2 * i
        m1 = tl.sum(tl.where(bits >= (thr | (1 << shift)), w, 0.0), axis=0)
        m2 = tl.sum(tl.where(bits >= (thr | (2 << shift)), w, 0.0), axis=0)
        m3 = tl.sum(tl.where(bits >= (thr | (3 << shift)), w, 0.0), axis=0)
        thr = _pick(thr, shift, m1, m2, m3, target)
    return thr


@triton.jit
def _radix_threshold(xrow, n, scale, m, p, hrow, fx_scale, offs, BLOCK: tl.constexpr):
    """Bit pattern of the largest weight ``w*`` with ``mass(w >= w*) >= p * mass`` over a streamed row.

    Four passes over the row, one per 8-bit digit of ``w*`` from the top; each adds every candidate's fixed-point
    mass (``w * fx_scale``, truncated) that shares the digits found so far into the histogram of its next digit
    (``hrow``: 256 int64 bins of scratch for this row), then keeps the largest digit ``d`` such that the mass above
    the current range plus the mass of the digits ``>= d`` still reaches the target.
    """
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int32)
    above = tl.full([], 0, tl.int64)
    target = tl.full([], 1, tl.int64)
    for rnd in tl.static_range(4):
        shift = 24 - 8 * rnd
        if rnd > 0:
            tl.debug_barrier()  # every thread has read the previous round's bins
        tl.store(hrow + bins, tl.zeros([256], tl.int64))
        tl.debug_barrier()  # the bins are clear before any thread adds to them
        for c0 in range(0, n, BLOCK):
            o = c0 + offs
            w = tl.exp(tl.load(xrow + o, mask=o < n, other=_NEG_INF) * scale - m)
            bits = w.to(tl.int32, bitcast=True)
            mass = (w * fx_scale).to(tl.int64)
            ok = (o < n) & (mass > 0)
            if rnd > 0:
                ok = ok & ((bits >> (shift + 8)) == prefix)  # inside the range of the digits found so far
            tl.atomic_add(hrow + ((bits >> shift) & 255), mass, mask=ok, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are done
        hist = tl.load(hrow + bins, volatile=True)  # (volatile: from L2, where the atomics went)
        if rnd == 0:  # the total mass, and the target: at least 1 unit, so that an empty row keeps nothing
            target = tl.maximum(tl.ceil(p.to(tl.float64) * tl.sum(hist, axis=0).to(tl.float64)).to(tl.int64), 1)
        suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # mass of the digits >= d
        digit = tl.max(tl.where(above + suffix >= target, bins, 0), axis=0)  # 0 when none reaches: empty row
        above += tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix = (prefix << 8) | digit
    return prefix


@triton.jit
def _top_p_threshold_kernel(x_ptr, stride_x, len_ptr, p_ptr, p_value, scale, N, G, thr_ptr, max_ptr, kept_ptr,
                            mask_ptr, stride_m, hist_ptr, fx_scale, HAS_LEN: tl.constexpr, WRITE_MASK: tl.constexpr,
                            ROW_P: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    r = tl.program_id(0)
    n = N
    if HAS_LEN:  # rows of query heads; their length is their kv-head's candidate count
        n = tl.minimum(tl.load(len_ptr + r // G), N)
    if ROW_P:
        p = tl.load(p_ptr + r)
    else:
        p = p_value
    xrow = x_ptr + r.to(tl.int64) * stride_x
    mrow = mask_ptr + r.to(tl.int64) * stride_m
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        ok = offs < n
        y = tl.load(xrow + offs, mask=ok, other=_NEG_INF) * scale
        m = tl.max(y, axis=0)
        m = tl.where(m == _NEG_INF, 0.0, m)  # a row without candidates: all weights 0
        w = tl.exp(y - m)
        target = p * tl.sum(w, axis=0)
        thr = _search_threshold(w, target)
        thr = tl.where(p >= 1.0, -1, thr)  # -1: keep every finite candidate
        keep = (y > _NEG_INF) & (((w.to(tl.int32, bitcast=True) >= thr) & (w > 0)) | (thr < 0))
        kept = tl.sum(keep.to(tl.int32), axis=0)
        if WRITE_MASK:  # (with HAS_LEN, slots past the row's length are left unwritten: nobody reads them)
            tl.store(mrow + offs, keep, mask=offs < n)
    else:
        m = tl.full([], _NEG_INF, tl.float32)
        for c0 in range(0, n, BLOCK):
            o = c0 + offs
            y = tl.load(xrow + o, mask=o < n, other=_NEG_INF) * scale
            m = tl.maximum(m, tl.max(y, axis=0))
        m = tl.where(m == _NEG_INF, 0.0, m)
        thr = tl.full([], -1, tl.int32)  # p >= 1: keep every finite candidate, no search
        if p < 1.0:
            thr = _radix_threshold(xrow, n, scale, m, p, hist_ptr + r.to(tl.int64) * 256, fx_scale, offs, BLOCK)
        kept = tl.full([], 0, tl.int32)
        for c0 in range(0, n, BLOCK):
            o = c0 + offs
            y = tl.load(xrow + o, mask=o < n, other=_NEG_INF) * scale
            w = tl.exp(y - m)
            keep = (y > _NEG_INF) & (((w.to(tl.int32, bitcast=True) >= thr) & (w > 0)) | (thr < 0))
            kept += tl.sum(keep.to(tl.int32), axis=0)
            if WRITE_MASK:
                tl.store(mrow + o, keep, mask=o < n)
    tl.store(thr_ptr + r, thr)
    tl.store(max_ptr + r, m)
    tl.store(kept_ptr + r, kept)


def _launch_threshold(x2d: torch.Tensor, p, scale: float, mask: torch.Tensor | None,
                      lengths: torch.Tensor | None = None, group: int = 1):
    """Launch the threshold kernel on the rows of ``x2d [R, N]``; ``p`` a float or a ``[R]`` float32 tensor.
    Returns ``(thr, rowmax, kept)``, each ``[R]`` (views of one buffer)."""
    R, N = x2d.shape
    out = torch.empty(3, R, dtype=torch.int32, device=x2d.device)
    thr, rowmax, kept = out[0], out[1].view(torch.float32), out[2]
    if R == 0:
        return thr, rowmax, kept
    single = N <= _MAX_SINGLE
    block = max(16, next_pow2(N)) if single else _CHUNK
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    # Streamed rows: 256 int64 histogram bins per row, cleared by the kernel; masses in units of 2^-F.
    hist = thr if single else torch.empty(R, _RADIX_BINS, dtype=torch.int64, device=x2d.device)
    row_p = isinstance(p, torch.Tensor)
    with launch_guard(x2d):
        _top_p_threshold_kernel[(R,)](
            x2d, x2d.stride(0), lengths if lengths is not None else thr, p if row_p else thr,
            0.0 if row_p else float(p), float(scale), N, group, thr, rowmax, kept,
            mask if mask is not None else thr, mask.stride(0) if mask is not None else 0,
            hist, float(2.0 ** (63 - max(N, 1).bit_length())),
            HAS_LEN=lengths is not None, WRITE_MASK=mask is not None, ROW_P=row_p, BLOCK=block, SINGLE=single,
            num_warps=warps, enable_fp_fusion=False)  # round x * scale before subtracting the max, as torch does
    return thr, rowmax, kept


def top_p_threshold(logits: torch.Tensor, p, scale: float = 1.0):
    """Per-row exact top-p threshold of ``logits * scale``.

    Returns ``(threshold_bits [R] int32, row_max [R] float32, kept [R] int32)`` over the rows
    ``R = prod(logits.shape[:-1])``: a candidate ``x`` is kept iff ``x > -inf`` and either ``threshold_bits < 0``
    (``p >= 1``) or ``w = exp(x * scale - row_max)`` is positive with float32 bit pattern ``>= threshold_bits``.

    Example::

        >>> thr, row_max, kept = top_p_threshold(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda")), 0.8)
        >>> kept
        tensor([2], device='cuda:0', dtype=torch.int32)
    """
    x = as_float_rows(logits)
    return _launch_threshold(x, kernel_p(p, tuple(logits.shape[:-1]), x.device), scale, None)


def top_p_mask(logits: torch.Tensor, p, scale: float = 1.0) -> torch.Tensor:
    """Smallest set of each row of ``logits * scale`` holding ``p`` of its softmax mass (sorting-free, exact).

    Args:
        logits: ``[..., N]`` float (any float dtype; computed in float32); ``-inf`` marks non-candidates.
        p: a float in ``(0, 1]`` or a tensor of shape ``logits.shape[:-1]``.
        scale: multiplies the logits first (e.g. the softmax scale, saving a pass over raw scores).
    Returns:
        ``[..., N]`` bool, identical to ``twilight.prune.top_p_mask(logits * scale, p)`` up to float summation
        order at exact mass ties.

    Example::

        >>> top_p_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda")), 0.8)
        tensor([[ True,  True, False, False]], device='cuda:0')
    """
    x = as_float_rows(logits)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    _launch_threshold(x, kernel_p(p, tuple(logits.shape[:-1]), x.device), scale, mask)
    return mask.reshape(logits.shape)


@triton.jit
def _union_compact_kernel(mask_ptr, idx_ptr, count_ptr, out_idx_ptr, out_count_ptr, G, K, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * Hkv + h
    count = tl.load(count_ptr + row)
    offs = tl.arange(0, BLOCK)
    irow = idx_ptr + row.to(tl.int64) * K
    orow = out_idx_ptr + row.to(tl.int64) * K
    written = tl.full([], 0, tl.int32)
    first = tl.full([], 0, tl.int32)
    for c0 in range(0, count, BLOCK):
        o = c0 + offs
        ok = o < count
        keep = tl.zeros([BLOCK], dtype=tl.int32)
        for g in range(0, G):
            mk = tl.load(mask_ptr + (row * G + g).to(tl.int64) * K + o, mask=ok, other=0)
            keep = keep | mk.to(tl.int32)
        keep = keep & ok.to(tl.int32)
        idx = tl.load(irow + o, mask=ok, other=0)
        slot = written + tl.cumsum(keep, axis=0) - 1
        tl.store(orow + slot, idx, mask=keep != 0)
        first += tl.sum(tl.where((keep != 0) & (slot == 0), idx, 0), axis=0)
        written += tl.sum(keep, axis=0)
    tl.store(out_count_ptr + row, written)
    # Padding repeats the first kept position (or 0), as twilight._tensors.compact does: valid, and write-only.
    for c0 in range((written // BLOCK) * BLOCK, K, BLOCK):
        o = c0 + offs
        tl.store(orow + o, tl.zeros([BLOCK], tl.int32) + first, mask=(o >= written) & (o < K))


def prune_to_selection(scores: torch.Tensor, sel: Selection, p, scale: float = 1.0) -> tuple[Selection, torch.Tensor]:
    """Top-p per query head over its kv-head's candidates, union over the GQA group, compacted into a `Selection`.

    Equivalent to (torch path of ``TwilightPipeline.prune``)::

        keep = twilight.prune.top_p_mask(scores * scale, p)                      # [B, Hq, K]
        keep_kv = keep.view(B, Hkv, G, K).any(2)
        indices, counts = twilight._tensors.compact(sel.indices, keep_kv)
        return Selection(indices, counts), keep.sum(-1, dtype=torch.int32)

    but without a host synchronisation: the output keeps the input's width ``K`` (``compact`` shrinks it to the
    largest count); kept candidates come first in their input order and slots past a row's count repeat its first
    kept position (or 0), as ``compact`` does.

    Args:
        scores: ``[B, Hq, K]`` estimated ``q·k`` (``estimate``'s output); only the first ``sel.counts`` slots of
            each row are read (later slots are treated as ``-inf``).
        sel: the candidates ``[B, Hkv, K]`` the scores belong to.
        p: float in ``(0, 1]`` or a tensor ``[B, Hq]``.
        scale: softmax scale applied to ``scores`` inside the kernel.
    Returns:
        ``(Selection [B, Hkv, K], q_counts [B, Hq] int32)``: the pruned selection and each query head's count.

    Example::

        >>> scores = backend.estimate(q, cache, sel, "int4")
        >>> pruned, q_counts = prune_to_selection(scores, sel, 0.85, scale=q.shape[-1] ** -0.5)
    """
    B, Hq, K, Hkv, G = check_prune_inputs(scores, sel)
    x = as_float_rows(scores)
    counts = sel.counts.contiguous()
    keep = torch.empty(B * Hq, K, dtype=torch.bool, device=x.device)
    _, _, kept = _launch_threshold(x, kernel_p(p, (B, Hq), x.device), scale, keep, lengths=counts, group=G)
    out_idx = torch.empty(B, Hkv, K, dtype=torch.int32, device=x.device)
    out_cnt = torch.empty(B, Hkv, dtype=torch.int32, device=x.device)
    if B * Hkv and K:
        with launch_guard(x):
            _union_compact_kernel[(B * Hkv,)](keep, sel.indices.contiguous(), counts, out_idx, out_cnt, G, K,
                                              BLOCK=min(1024, max(16, next_pow2(K))), num_warps=4)
    else:
        out_cnt.zero_()
    return Selection(out_idx, out_cnt), kept.view(B, Hq)
