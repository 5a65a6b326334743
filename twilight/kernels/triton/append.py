"""A decode step's cache update in one launch: the new token's int4 codes, their scale and mid, Quest's page bounds.

``update_token(cache, pos)`` does for position ``pos`` what ``LayerCache._update_one`` does with ~20 torch ops:
one program per (batch, kv-head) row reads the token's key once and

- quantizes it (per-token min-max, ``twilight.quant``): ``scale = max((max - min) / 15, 1e-8)``,
  ``mid = min + 8 * scale``, ``code = clamp(round((k - mid) / scale + 8), 0, 15)`` (round half to even), and
  writes the code into its nibble of the tiled layout (low nibble: a fresh byte; high nibble: or-ed in);
- widens the page bounds of ``pos``'s page (each sequence's own, cut from its first valid token) with the key,
  rounded outward to the bounds dtype (by the bit pattern: the tightest bf16 values on either side, at most one
  unit tighter than ``twilight.quant.round_outward``'s, which widens before a round-to-nearest cast).

``LayerCache.token_updater`` is set to it for the caches the triton backend builds (int4 keys in 64-token tiles,
no int8 keys or labels: other layouts update with torch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twilight.cache import LayerCache
from twilight.kernels.triton._common import launch_guard
from twilight.quant import INT4_TILE

__all__ = ["update_token", "supports"]


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _bf16_outward(x):
    """``x`` (float32) rounded up and down to bfloat16 values, by their bit patterns (exact casts afterwards,
    whatever the rounding mode of a cast: the interpreter truncates, a GPU rounds to nearest)."""
    b = x.to(tl.int32, bitcast=True)
    trunc = b & -65536  # drop the 16 low mantissa bits: rounds the magnitude down
    mag_up = tl.where((b & 65535) != 0, trunc + 65536, trunc)  # rounds the magnitude up (max finite -> inf)
    up = tl.where(x >= 0, mag_up, trunc).to(tl.float32, bitcast=True)
    down = tl.where(x >= 0, trunc, mag_up).to(tl.float32, bitcast=True)
    return up, down


@triton.jit
def _update_token_kernel(k_ptr, packed_ptr, qparams_ptr, bounds_ptr, start_ptr, H, pos, cap, page,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, BOUNDS: tl.constexpr,
                         WIDEN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * Hkv + h
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(k_ptr + (row * cap + pos) * D + offs, mask=ok, other=0.0).to(tl.float32)
    if QUANT:
        lo = tl.min(tl.where(ok, x, float("inf")), axis=0)
        hi = tl.max(tl.where(ok, x, float("-inf")), axis=0)
        scale = tl.maximum(tl.math.div_rn(hi - lo, 15.0), 1e-8)
        mid = lo + 8.0 * scale
        code = _round_half_even(tl.math.div_rn(x - mid, scale) + 8.0)
        code = tl.minimum(tl.maximum(code, 0.0), 15.0).to(tl.int32)
        tl.store(qparams_ptr + (row * cap + pos) * 2, scale)
        tl.store(qparams_ptr + (row * cap + pos) * 2 + 1, mid)
        c = pos % 64
        byte_ptr = packed_ptr + row * cap * (D // 2) + (pos - c) * (D // 2) + offs * 32 + (c % 32)
        if c < 32:  # low nibble: the high one belongs to a later position, not written yet
            tl.store(byte_ptr, code.to(tl.uint8), mask=ok)
        else:
            old = tl.load(byte_ptr, mask=ok, other=0).to(tl.int32)
            tl.store(byte_ptr, (old | (code << 4)).to(tl.uint8), mask=ok)
    if BOUNDS:
        # the sequence's own page of pos: its pages start at its first valid token (twilight.cache)
        offset = tl.load(start_ptr + row // H) % page
        base = bounds_ptr + (row * (cap // page) + (pos - offset) // page) * 2 * D
        if WIDEN:  # float32 keys, bfloat16 bounds: directed rounding, so the bounds still bound the keys
            up, down = _bf16_outward(x)
        else:  # the key is exact in the bounds' dtype
            up = x
            down = x
        dt = bounds_ptr.dtype.element_ty
        old_hi = tl.load(base + offs, mask=ok, other=0.0)
        old_lo = tl.load(base + D + offs, mask=ok, other=0.0)
        tl.store(base + offs, tl.maximum(old_hi.to(tl.float32), up).to(dt), mask=ok)
        tl.store(base + D + offs, tl.minimum(old_lo.to(tl.float32), down).to(dt), mask=ok)


def supports(cache: LayerCache) -> bool:
    """Whether ``update_token`` can update ``cache`` (int4 keys in 64-token tiles or none; no int8 keys, no labels)."""
    bounds_ok = (not cache.keep_page_bounds or cache.bounds_dtype == cache.dtype
                 or (cache.bounds_dtype == torch.bfloat16 and cache.dtype == torch.float32))
    return (cache.quant_bits in (None, 4) and cache.label_channels is None and bounds_ok
            and (cache.quant_bits is None or cache.int4_block == INT4_TILE))


def update_token(cache: LayerCache, pos: int) -> None:
    """The derived structures of the single valid position ``pos`` of ``cache`` (one Triton launch)."""
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    quant, bounds = cache.quant_bits == 4, cache.keep_page_bounds
    if not (quant or bounds):
        return
    widen = cache.bounds_dtype != cache.dtype  # float32 keys, bf16 bounds (supports() excludes other pairs)
    with launch_guard(cache.k):
        _update_token_kernel[(B * H,)](
            cache.k, cache.k_int4 if quant else cache.k, cache.k_qparams if quant else cache.k,
            cache.page_bounds if bounds else cache.k, cache.start, H, pos, cache.capacity, cache.page_size,
            D=D, BLOCK_D=triton.next_power_of_2(D), QUANT=quant, BOUNDS=bounds, WIDEN=widen)
