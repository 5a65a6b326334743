"""Sparse decode attention over a `Selection` in Triton: flash-decoding split over tokens, then a merge.

Budgets differ by orders of magnitude between heads after top-p pruning, so work is divided by tokens, not by
head: each (batch, kv-head) row's selected tokens are cut into chunks of ``chunk`` tokens and every chunk is one
program (grid ``[rows, max chunks]``; programs past a row's count exit at once). A program gathers its tokens'
exact K/V rows once and serves all ``G`` query heads of the GQA group (``tl.dot`` of the group's queries with
the gathered keys), keeping an online softmax. A row that fits in one chunk writes its output directly; longer
rows write partial ``(max, sum, acc)`` states that a second kernel merges.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twilight.cache import LayerCache
from twilight.kernels._validate import check_group_selection, check_q, check_selection, next_pow2
from twilight.kernels.triton._common import dot, dot_in_f32, launch_guard
from twilight.selection import Selection

__all__ = ["sparse_decode_attention", "choose_chunk"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_chunk_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, count_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                       stride_kb, stride_kh, stride_kn, H, G, K, n_chunks, qk_scale, CHUNK,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_F32: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    chunk = tl.program_id(1)
    count = tl.load(count_ptr + row)
    lo = chunk * CHUNK
    if lo < count:
        hi = tl.minimum(lo + CHUNK, count)
        b = row // H
        h = row % H
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < G
        d_ok = offs_d < D
        q = tl.load(q_ptr + (row * G + offs_g)[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [BLOCK_G, BLOCK_D]
        kv_off = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            idx = tl.load(idx_ptr + row.to(tl.int64) * K + offs_n, mask=n_ok, other=0)
            tok = kv_off + idx.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
            m2 = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + tok, mask=m2, other=0.0)
            s = dot(q, tl.trans(k), DOT_F32) * qk_scale  # [BLOCK_G, BLOCK_N], log2 domain
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            v = tl.load(v_ptr + tok, mask=m2, other=0.0)
            acc = acc * alpha[:, None] + dot(pr.to(v_ptr.dtype.element_ty), v, DOT_F32)
            m_i = m_new
        g_rows = (row * G + offs_g).to(tl.int64)
        if count <= CHUNK:  # the whole row in this program: final output
            o = acc / l_i[:, None]
            tl.store(out_ptr + g_rows[:, None] * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])
        else:  # partial state for the merge
            part = (row.to(tl.int64) * n_chunks + chunk) * BLOCK_G + offs_g  # [BLOCK_G]
            tl.store(part_acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
            tl.store(part_ml_ptr + part * 2, m_i, mask=g_ok)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _attn_merge_kernel(count_ptr, out_ptr, part_acc_ptr, part_ml_ptr, G, n_chunks, CHUNK,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
    row = tl.program_id(0)
    count = tl.load(count_ptr + row)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    m2 = g_ok[:, None] & (offs_d < D)[None, :]
    out = out_ptr + (row * G + offs_g).to(tl.int64)[:, None] * D + offs_d[None, :]
    if count == 0:  # an empty selection attends to nothing: zeros, as the torch reference
        tl.store(out, tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty), mask=m2)
    elif count > CHUNK:
        n = tl.cdiv(count, CHUNK)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for c in range(0, n):
            part = (row.to(tl.int64) * n_chunks + c) * BLOCK_G + offs_g
            m_c = tl.load(part_ml_ptr + part * 2, mask=g_ok, other=0.0)
            l_c = tl.load(part_ml_ptr + part * 2 + 1, mask=g_ok, other=1.0)
            a_c = tl.load(part_acc_ptr + part[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
            m_new = tl.maximum(m_i, m_c)
            alpha = tl.exp2(m_i - m_new)
            beta = tl.exp2(m_c - m_new)
            l_i = l_i * alpha + l_c * beta
            acc = acc * alpha[:, None] + a_c * beta[:, None]
            m_i = m_new
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=m2)


def choose_chunk(k_max: int) -> int:
    """Tokens per program: 256, growing with the widest row so a program always has a few hundred tokens'
    work while rows of 1000x different budgets still spread over many programs."""
    return max(256, next_pow2(max(k_max, 1) // 64))


def sparse_decode_attention(q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float,
                            chunk: int | None = None) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over the exact K/V of the tokens ``sel`` picks for each kv-head.

    Args:
        q: ``[B, Hq, D]`` in the cache's dtype (fp32/fp16/bf16); query head ``h * G + g`` uses kv-head ``h``.
        cache: the layer's ``LayerCache`` (``k``/``v`` ``[B, Hkv, cap, D]``, last dim contiguous).
        sel: ``indices [B, Hkv, K_max]`` int32 positions and ``counts [B, Hkv]`` int32; any width and any order.
        scale: softmax scale (usually ``D ** -0.5``).
        chunk: tokens per program (default ``choose_chunk(K_max)``; a multiple of 64).
    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; a row with an empty selection yields zeros — the contract of
        ``twilight.attention.sparse_decode_attention``.

    Example::

        >>> out = sparse_decode_attention(q, cache, sel, q.shape[-1] ** -0.5)  # q, cache, sel on one GPU
    """
    G = check_q(q, cache)
    check_selection(sel, cache)
    check_group_selection(sel, "the Triton sparse decode attention")
    if q.dtype != cache.dtype:
        raise ValueError(f"q dtype {q.dtype} does not match the cache dtype {cache.dtype}")
    if cache.k.stride(-1) != 1 or cache.v.stride() != cache.k.stride():
        raise ValueError("cache.k and cache.v must share strides with a contiguous last dimension")
    B, Hq, D = q.shape
    H = cache.num_kv_heads
    K = sel.k_max
    BLOCK_N = 64 if D <= 64 else 32
    chunk = choose_chunk(K) if chunk is None else int(chunk)
    if chunk < BLOCK_N or chunk % BLOCK_N:
        raise ValueError(f"chunk={chunk} must be a positive multiple of {BLOCK_N}")
    n_chunks = max(triton.cdiv(K, chunk), 1)
    BLOCK_G, BLOCK_D = max(16, next_pow2(G)), max(16, next_pow2(D))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    q = q.contiguous()
    idx, counts = sel.indices.contiguous(), sel.counts.contiguous()
    if n_chunks > 1:
        part_acc = torch.empty(B * H * n_chunks * BLOCK_G, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B * H * n_chunks * BLOCK_G, 2, dtype=torch.float32, device=q.device)
    else:  # no row can need a merge
        part_acc = part_ml = out
    sk = cache.k.stride()
    with launch_guard(q):
        _attn_chunk_kernel[(B * H, n_chunks)](
            q, cache.k, cache.v, idx, counts, out, part_acc, part_ml, sk[0], sk[1], sk[2], H, G, K, n_chunks,
            float(scale) * _LOG2E, chunk, D=D, BLOCK_D=BLOCK_D, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N,
            DOT_F32=dot_in_f32(q.dtype), num_warps=4)
        _attn_merge_kernel[(B * H,)](counts, out, part_acc, part_ml, G, n_chunks, chunk,
                                     D=D, BLOCK_D=BLOCK_D, BLOCK_G=BLOCK_G, num_warps=4)
    return out
