"""4-bit SpGEMV in Triton: estimated ``q·k`` of the candidates from the packed int4 K cache.

``int4_scores(q, cache, sel) -> [B, Hq, K_max]`` float32 reads, for each candidate token, its ``D / 2`` packed
bytes (tiled layout of ``twilight.quant``: byte ``[tile, d, c % 32]``, low nibble for ``c < 32``) and its
``(scale, mid)``, and scores it against every query head of its kv-head's GQA group in one pass:

    q·k ≈ scale * (q · (code - 8)) + mid * sum(q)

One program handles ``BLOCK_N`` candidates of one (batch, kv-head) row; the codes are unpacked in registers and
multiplied with the group's queries on the tensor cores (``tl.dot``; codes minus 8 are exact in fp16/bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twilight.cache import LayerCache
from twilight.kernels._validate import check_int4_cache, check_q, check_selection, next_pow2
from twilight.kernels.triton._common import dot, dot_in_f32, launch_guard
from twilight.quant import INT4_TILE
from twilight.selection import Selection

__all__ = ["int4_scores"]

assert INT4_TILE == 64  # the kernel hard-codes the tile geometry (check_int4_cache checks the cache's)


@triton.jit
def _int4_spgemv_kernel(q_ptr, packed_ptr, qparams_ptr, idx_ptr, count_ptr, out_ptr, G, K, cap,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_F32: tl.constexpr):
    row = tl.program_id(0)  # b * Hkv + h
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    count = tl.load(count_ptr + row)
    n_ok = offs_n < count
    out_rows = out_ptr + (row * G + offs_g).to(tl.int64)[:, None] * K + offs_n[None, :]  # [BLOCK_G, BLOCK_N]
    store_ok = g_ok[:, None] & (offs_n < K)[None, :]
    if tl.program_id(1) * BLOCK_N < count:
        idx = tl.load(idx_ptr + row.to(tl.int64) * K + offs_n, mask=n_ok, other=0)
        tile = idx // 64
        col = idx % 64
        # byte offset of channel 0 of each candidate inside the row's packed tiles: [tile, d, col % 32]
        byte0 = row.to(tl.int64) * (cap * (D // 2)) + tile.to(tl.int64) * (32 * D) + (col % 32)
        shift = (col // 32) * 4  # high nibble for tokens 32..63 of a tile
        acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        qsum = tl.zeros([BLOCK_G], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            qd = tl.load(q_ptr + (row * G + offs_g)[:, None] * D + offs_d[None, :],
                         mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
            qsum += tl.sum(qd.to(tl.float32), axis=1)
            byte = tl.load(packed_ptr + byte0[None, :] + offs_d[:, None] * 32,
                           mask=d_ok[:, None] & n_ok[None, :], other=0x88)  # [BLOCK_D, BLOCK_N] uint8
            code = (byte.to(tl.int32) >> shift[None, :]) & 0xF
            vals = (code - 8).to(tl.float32).to(q_ptr.dtype.element_ty)  # exact in fp16/bf16
            acc += dot(qd, vals, DOT_F32)
        qp = qparams_ptr + (row.to(tl.int64) * cap + idx) * 2
        scale = tl.load(qp, mask=n_ok, other=0.0)
        mid = tl.load(qp + 1, mask=n_ok, other=0.0)
        est = acc * scale[None, :] + qsum[:, None] * mid[None, :]
        est = tl.where(n_ok[None, :], est, float("-inf"))
        tl.store(out_rows, est, mask=store_ok)
    else:
        tl.store(out_rows, tl.full([BLOCK_G, BLOCK_N], float("-inf"), tl.float32), mask=store_ok)


def int4_scores(q: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """Approximate ``q·k`` of each query head for its kv-head's candidates, from the int4 K cache.

    Args:
        q: ``[B, Hq, D]`` fp32/fp16/bf16 (``Hq`` a multiple of ``Hkv``; query head ``h * G + g`` belongs to
            kv-head ``h``).
        cache: a ``LayerCache`` with ``quant_bits=4`` (``k_int4 [B, Hkv, cap, D // 2]`` uint8 and
            ``k_qparams [B, Hkv, cap, 2]`` float32).
        sel: candidates, ``indices [B, Hkv, K_max]`` int32 and ``counts [B, Hkv]`` int32.
    Returns:
        ``[B, Hq, K_max]`` float32 raw dot products (not multiplied by the softmax scale), ``-inf`` at slots
        ``>= counts`` — the contract of ``twilight.estimate.estimate_scores(..., "int4")``.

    Example::

        >>> cache = LayerCache(1, 2, 128, dtype=torch.float16, device="cuda")
        >>> cache.append(*torch.randn(2, 1, 2, 1000, 128, dtype=torch.float16, device="cuda"))
        >>> sel = Selection.full(1, 2, 1000, device="cuda")
        >>> int4_scores(torch.randn(1, 8, 128, dtype=torch.float16, device="cuda"), cache, sel).shape
        torch.Size([1, 8, 1000])
    """
    G = check_q(q, cache)
    check_selection(sel, cache)
    check_int4_cache(cache)
    B, Hkv, D = cache.batch, cache.num_kv_heads, cache.head_dim
    K = sel.k_max
    out = torch.empty(B, Hkv * G, K, dtype=torch.float32, device=q.device)
    if K == 0:
        return out
    q = q.contiguous()
    idx, counts = sel.indices.contiguous(), sel.counts.contiguous()
    BLOCK_N = 64
    with launch_guard(q):
        _int4_spgemv_kernel[(B * Hkv, triton.cdiv(K, BLOCK_N))](
            q, cache.k_int4, cache.k_qparams, idx, counts, out, G, K, cache.capacity,
            D=D, BLOCK_D=min(64, max(16, next_pow2(D))), BLOCK_G=max(16, next_pow2(G)), BLOCK_N=BLOCK_N,
            DOT_F32=dot_in_f32(q.dtype), num_warps=4)
    return out
