"""Quest in Triton: page upper bounds of ``q·k`` and the top-page candidate `Selection`.

- ``quest_page_scores(q, cache) -> [B, Hkv, pages]`` float32: for each page, the upper bound of
  ``max over the GQA group of q·k`` from the page's channel-wise ``[max | min]`` (``cache.page_bounds``);
  ``-inf`` for pages holding no valid token. Same definition as ``twilight.select.quest_page_scores``.
- ``quest_select(q, cache, token_budget, page_size=None) -> Selection``: Quest's candidate set, as the torch
  selector (``twilight.select``, type ``quest``) defines it: ``n_pages = ceil(token_budget / page_size)`` pages per
  kv-head, always including the most recent page (the partial last one: Quest and the original Twilight code
  always attend to the current page), the other ``n_pages - 1`` the best by page bound among the other pages
  holding a valid token; expanded to their valid tokens, the others in page order, the last page last.
- ``top_pages_to_tokens(scores, cache, n_pages, row_budget=None) -> Selection``: the ``n_pages`` best pages of any
  page scores (no page forced), expanded the same way.

The top pages are found exactly and without sorting, in two kernels. ``_block_select_kernel`` runs several
programs per (batch, kv-head) row, each on a block of ``_PAGE_BLOCK`` pages: it finds its block's own top
``n_pages`` (a radix select over the pages' order-preserving 32-bit keys, 8 bits per round, on ``tl.histogram``;
the block's keys stay in registers) and writes them, compacted, as the row's candidates: the row's top pages are
among them. ``_merge_expand_kernel`` (one program per row) runs the same radix select over the candidates (4
passes over at most ``blocks * n_pages`` keys, instead of a 32-step search over every page) and expands the
chosen pages to tokens with a prefix sum. Ties at the cut-off go to the lower page index. Neither synchronises
with the host: the output width is ``n_pages * page_size``; padding slots hold ``length - 1``, a valid position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from twilight.cache import LayerCache
from twilight.kernels._validate import check_q, next_pow2
from twilight.kernels.triton._common import dot, dot_in_f32, launch_guard
from twilight.selection import Selection

__all__ = ["quest_page_scores", "quest_select", "top_pages_to_tokens"]

_NEG_INF = tl.constexpr(float("-inf"))
_PAGE_BLOCK = 1024  # pages per program of the block-select kernel
_EXPAND_TOKENS = 2048  # tokens written per step when expanding the chosen pages (keeps registers unspilled)


@triton.jit
def _quest_scores_kernel(q_ptr, bounds_ptr, start_ptr, out_ptr, P, H, G, bounds_row_stride, page_size, length,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                         DOT_F32: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, BLOCK_G)
    p_ok = offs_p < P
    d_ok = offs_d < D
    g_ok = offs_g < G
    # The group's queries [BLOCK_G, BLOCK_D] in their own dtype, never rounded to the bounds' (DOT_F32 is set when
    # the two differ); compared in float32 (the interpreter mis-compares bf16).
    q = tl.load(q_ptr + (row * G + offs_g)[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    q_pos = tl.where(q > 0, q, 0.0).to(q_ptr.dtype.element_ty)
    q_neg = tl.where(q < 0, q, 0.0).to(q_ptr.dtype.element_ty)
    start = tl.load(start_ptr + row // H)
    # The sequence's pages start at its first valid token (twilight.cache): pages wholly in left padding, and a
    # page past the end of a sequence whose grid is offset, hold no valid token (+-inf bounds): skip them.
    has_valid = (offs_p >= start // page_size) & (offs_p * page_size + start % page_size < length)
    page = bounds_ptr + row.to(tl.int64) * bounds_row_stride + offs_p[:, None] * (2 * D) + offs_d[None, :]
    m2 = (p_ok & has_valid)[:, None] & d_ok[None, :]
    hi = tl.load(page, mask=m2, other=0.0)  # [BLOCK_P, BLOCK_D] channel max
    lo = tl.load(page + D, mask=m2, other=0.0)  # channel min
    # max(q_d * hi_d, q_d * lo_d) = relu(q_d) * hi_d + min(q_d, 0) * lo_d
    s = dot(hi, tl.trans(q_pos), DOT_F32) + dot(lo, tl.trans(q_neg), DOT_F32)  # [BLOCK_P, BLOCK_G] fp32
    s = tl.where(g_ok[None, :], s, _NEG_INF)
    score = tl.max(s, axis=1)
    score = tl.where(has_valid, score, _NEG_INF)
    tl.store(out_ptr + row.to(tl.int64) * P + offs_p, score, mask=p_ok)


def quest_page_scores(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Quest's upper bound of ``max_g q_g·k`` for every page: ``[B, Hkv, pages]`` float32.

    Args:
        q: ``[B, Hq, D]`` (fp32/fp16/bf16), ``Hq`` a multiple of the cache's ``Hkv``.
        cache: a ``LayerCache`` built with ``keep_page_bounds=True``.
    Returns:
        ``[B, Hkv, cache.num_pages]`` float32; pages with no valid token (left padding) are ``-inf``.
        The products of ``q`` (not rounded) and the stored bounds, summed in float32, as every backend does.

    Example::

        >>> cache = LayerCache(1, 2, 64, device="cuda", dtype=torch.float16)
        >>> cache.append(*(torch.randn(2, 1, 2, 100, 64, device="cuda", dtype=torch.float16)))
        >>> quest_page_scores(torch.randn(1, 8, 64, device="cuda", dtype=torch.float16), cache).shape
        torch.Size([1, 2, 7])
    """
    G = check_q(q, cache)
    if not cache.keep_page_bounds:
        raise ValueError("quest needs a cache built with keep_page_bounds=True (the per-page key bounds)")
    cache.update_derived()  # (a no-op unless the cache defers its derived structures)
    B, H, D, P = cache.batch, cache.num_kv_heads, cache.head_dim, cache.num_pages
    out = torch.empty(B, H, P, dtype=torch.float32, device=q.device)
    if P == 0:
        return out
    bounds = cache.page_bounds
    if not bounds.is_contiguous():
        bounds = bounds.contiguous()
    q = q.contiguous()
    BLOCK_P = 64
    with launch_guard(q):
        _quest_scores_kernel[(B * H, triton.cdiv(P, BLOCK_P))](
            q, bounds, cache.start, out, P, H, G, bounds.stride(1), cache.page_size, cache.length,
            D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_G=max(16, next_pow2(G)), BLOCK_P=BLOCK_P,
            DOT_F32=dot_in_f32(bounds.dtype) or q.dtype != bounds.dtype, num_warps=4)
    return out


@triton.jit
def _ordered_ukey(s):
    """float32 -> uint32 with the same order (unsigned compare)."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order
    return key.to(tl.uint32, bitcast=True) ^ 0x80000000


@triton.jit
def _radix_digit(hist, remaining, prefix):
    """One round of a radix select from a digit histogram: the largest digit ``d`` with ``#(digits >= d) >=
    remaining``; returns the prefix extended by ``d`` and how many of the k largest remain to be found within it."""
    bins = tl.arange(0, 256)
    suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # entries with digit >= d
    d = tl.max(tl.where(suffix >= remaining, bins, 0), axis=0)
    remaining -= tl.sum(tl.where(bins > d, hist, 0), axis=0)
    return (prefix << 8) | d.to(tl.uint32), remaining


@triton.jit
def _kth_largest(ukey, valid, k):
    """``(T, ties)``: ``T`` the ``k``-th largest of ``ukey[valid]`` (``1 <= k <= #valid``), ``ties`` how many entries
    equal to ``T`` are among the ``k`` largest. Four rounds of 8 bits over keys held in registers."""
    prefix = tl.full([], 0, tl.uint32)
    remaining = k
    for rnd in tl.static_range(4):
        shift = 24 - 8 * rnd
        act = valid
        if rnd > 0:
            act = act & ((ukey >> (shift + 8)) == prefix)
        hist = tl.histogram(((ukey >> shift) & 255).to(tl.int32), 256, mask=act)
        prefix, remaining = _radix_digit(hist, remaining, prefix)
    return prefix, remaining


@triton.jit
def _block_select_kernel(scores_ptr, start_ptr, key_ptr, first_ptr, cnt_ptr, P, H, n_cand, k, row_budget, length,
                         page_size, NB, BPK, BP: tl.constexpr, FORCE_LAST: tl.constexpr):
    """Program (row, block): the block's top ``k`` candidate pages (all its valid ones when fewer, or when the
    row's valid tokens fit in ``row_budget``), compacted in page order into the row's candidate slots, each as its
    key and its first position (``page * page_size + start % page_size``: the sequence's pages are cut from its
    first valid token). With ``FORCE_LAST`` the sequence's last page does not compete (it is taken anyway)."""
    row = tl.program_id(0)  # b * H + h
    blk = tl.program_id(1)
    start = tl.load(start_ptr + row // H)
    pg = blk * BP + tl.arange(0, BP)
    s = tl.load(scores_ptr + row.to(tl.int64) * P + pg, mask=pg < n_cand, other=_NEG_INF)
    valid = s > _NEG_INF
    offset = start % page_size
    if FORCE_LAST:
        valid = valid & (pg != (length - 1 - offset) // page_size)
    ukey = _ordered_ukey(s)
    take = valid
    if (length - start > row_budget) & (tl.sum(valid.to(tl.int32), axis=0) > k):
        thr, ties = _kth_largest(ukey, valid, k)
        tie = valid & (ukey == thr)
        take = valid & ((ukey > thr) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= ties)))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    base = (row.to(tl.int64) * NB + blk) * BPK
    tl.store(key_ptr + base + slot, ukey.to(tl.int32, bitcast=True), mask=take)
    tl.store(first_ptr + base + slot, pg * page_size + offset, mask=take)
    tl.store(cnt_ptr + row * NB + blk, tl.sum(take.to(tl.int32), axis=0))


@triton.jit
def _merge_expand_kernel(key_ptr, first_ptr, cnt_ptr, start_ptr, out_ptr, count_ptr, H, k, row_budget, length,
                         page_size, width, NB, BPK, NB_P2: tl.constexpr, BLOCK: tl.constexpr,
                         PS: tl.constexpr, EXPAND: tl.constexpr, FORCE_LAST: tl.constexpr):
    """Program (row): the top ``k`` of the row's candidates, expanded to their valid tokens in page order (then the
    forced last page), count, and padding."""
    row = tl.program_id(0)  # b * H + h
    start = tl.load(start_ptr + row // H)
    b_offs = tl.arange(0, NB_P2)
    n_cands = tl.sum(tl.load(cnt_ptr + row * NB + b_offs, mask=b_offs < NB, other=0), axis=0)
    k = tl.where(length - start <= row_budget, n_cands, tl.minimum(k, n_cands))
    take_all = k >= n_cands
    thr = tl.full([], 0, tl.uint32)
    ties_left = k
    offs = tl.arange(0, BLOCK)
    if not take_all:  # radix select over the candidates, block by block (4 passes)
        for rnd in tl.static_range(4):
            shift = 24 - 8 * rnd
            hist = tl.zeros([256], tl.int32)
            for b in range(0, NB):
                cb = tl.load(cnt_ptr + row * NB + b)
                base = (row.to(tl.int64) * NB + b) * BPK
                for j0 in range(0, cb, BLOCK):
                    j = j0 + offs
                    ok = j < cb
                    ukey = tl.load(key_ptr + base + j, mask=ok, other=0).to(tl.uint32, bitcast=True)
                    if rnd > 0:
                        ok = ok & ((ukey >> (shift + 8)) == thr)
                    hist += tl.histogram(((ukey >> shift) & 255).to(tl.int32), 256, mask=ok)
            thr, ties_left = _radix_digit(hist, ties_left, thr)
    # Expand the chosen pages to their valid tokens [first, min(first + page_size, length)), ``first`` the page's
    # first position as the block kernel stored it (never before start: pages wholly in left padding score -inf and
    # are not taken).
    orow = out_ptr + row.to(tl.int64) * width
    tok = tl.arange(0, PS)
    e_offs = tl.arange(0, EXPAND)  # [EXPAND, PS] token tiles: few enough pages per step to stay in registers
    written = tl.full([], 0, tl.int32)
    ties_seen = tl.full([], 0, tl.int32)
    for b in range(0, NB):
        cb = tl.load(cnt_ptr + row * NB + b)
        base = (row.to(tl.int64) * NB + b) * BPK
        for j0 in range(0, cb, EXPAND):
            j = j0 + e_offs
            ok = j < cb
            ukey = tl.load(key_ptr + base + j, mask=ok, other=0).to(tl.uint32, bitcast=True)
            first = tl.load(first_ptr + base + j, mask=ok, other=0)
            tie = ok & (ukey == thr)
            tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among tied pages
            take = ok & (take_all | (ukey > thr) | (tie & (tie_rank <= ties_left)))
            ties_seen += tl.sum(tie.to(tl.int32), axis=0)
            n_tok = tl.where(take, tl.maximum(tl.minimum(length - first, page_size), 0), 0)
            slot0 = written + tl.cumsum(n_tok, axis=0) - n_tok  # exclusive prefix sum
            tl.store(orow + slot0[:, None] + tok[None, :], first[:, None] + tok[None, :],
                     mask=tok[None, :] < n_tok[:, None])
            written += tl.sum(n_tok, axis=0)
    if FORCE_LAST:  # the most recent page, last: it starts a whole number of pages after the sequence's start
        first = start + (length - 1 - start) // page_size * page_size
        n_last = tl.maximum(length - first, 0)
        tl.store(orow + written + tok, first + tok, mask=tok < n_last)
        written += n_last
    tl.store(count_ptr + row, written)
    pad = tl.maximum(length - 1, 0)  # a valid position of every row that has one
    for c0 in range((written // BLOCK) * BLOCK, width, BLOCK):
        o = c0 + offs
        tl.store(orow + o, tl.zeros([BLOCK], tl.int32) + pad, mask=(o >= written) & (o < width))


def _top_pages(scores: torch.Tensor, cache: LayerCache, n_pages: int, row_budget: int,
               force_last: bool) -> Selection:
    """``n_pages`` pages per row of ``scores [B, Hkv, P]`` as tokens; with ``force_last`` the last page plus the
    best ``n_pages - 1`` others; a row whose valid tokens number ``<= row_budget`` takes all its valid pages."""
    B, H, P = scores.shape
    ps, rows = cache.page_size, B * H
    width = n_pages * ps
    k = n_pages - 1 if force_last else n_pages  # pages chosen by score (the kernels keep each row's last page out)
    n_cand = P  # pages that compete
    BP = min(_PAGE_BLOCK, max(16, next_pow2(n_cand)))
    NB = triton.cdiv(n_cand, BP) if k > 0 or row_budget >= 0 else 0
    BPK = BP if row_budget >= 0 else min(BP, k)  # candidate slots per block
    out = torch.empty(B, H, width, dtype=torch.int32, device=scores.device)
    counts = torch.empty(B, H, dtype=torch.int32, device=scores.device)
    if rows == 0:
        return Selection(out, counts)
    n_slots = rows * NB * BPK
    scratch = torch.empty(2 * n_slots + rows * NB, dtype=torch.int32, device=scores.device) if NB else out
    keys, firsts, cnt = (scratch[:n_slots], scratch[n_slots:2 * n_slots], scratch[2 * n_slots:]) if NB else (out,) * 3
    scores = scores.contiguous()
    pow2_ps = next_pow2(ps)
    with launch_guard(scores):
        if NB:
            _block_select_kernel[(rows, NB)](scores, cache.start, keys, firsts, cnt, P, H, n_cand, k, row_budget,
                                             cache.length, ps, NB, BPK, BP=BP, FORCE_LAST=force_last, num_warps=4)
        _merge_expand_kernel[(rows,)](
            keys, firsts, cnt, cache.start, out, counts, H, k, row_budget, cache.length, ps, width, NB, BPK,
            NB_P2=max(2, next_pow2(NB)), BLOCK=min(1024, max(16, next_pow2(max(BPK, 1)))), PS=pow2_ps,
            EXPAND=max(16, min(next_pow2(max(BPK, 1)), _EXPAND_TOKENS // pow2_ps)), FORCE_LAST=force_last,
            num_warps=4)
    return Selection(out, counts)


def top_pages_to_tokens(scores: torch.Tensor, cache: LayerCache, n_pages: int,
                        row_budget: int | None = None) -> Selection:
    """The ``n_pages`` highest-scoring pages of each row of ``scores [B, Hkv, P]``, as a token `Selection`.

    Pages scoring ``-inf`` are never taken; ties at the k-th score go to the lower page index. Each taken page
    contributes its valid tokens (inside ``[start[b], length)``), in page order. A sequence with at most
    ``row_budget`` valid tokens (default ``n_pages * page_size``) takes all of them. The result has width
    ``n_pages * page_size`` (no host synchronisation); slots past a row's count hold ``length - 1``.

    Example::

        >>> scores = quest_page_scores(q, cache)                 # [B, Hkv, P] float32
        >>> sel = top_pages_to_tokens(scores, cache, n_pages=256)  # indices [B, Hkv, 256 * page_size]
    """
    B, H, P = scores.shape
    if (B, H) != (cache.batch, cache.num_kv_heads) or P != cache.num_pages:
        raise ValueError(f"scores must be [B={cache.batch}, Hkv={cache.num_kv_heads}, pages={cache.num_pages}], "
                         f"got {tuple(scores.shape)}")
    if n_pages < 1:
        raise ValueError(f"n_pages={n_pages} must be >= 1")
    width = n_pages * cache.page_size
    row_budget = width if row_budget is None else min(int(row_budget), width)
    return _top_pages(scores, cache, n_pages, max(row_budget, 0), force_last=False)


def quest_select(q: torch.Tensor, cache: LayerCache, token_budget: int, page_size: int | None = None) -> Selection:
    """Quest's candidate set: ``ceil(token_budget / page_size)`` pages per kv-head, the most recent one always.

    Args:
        q: ``[B, Hq, D]``; cache: a ``LayerCache`` with page bounds.
        token_budget: candidate tokens per kv-head (Quest's budget).
        page_size: must equal ``cache.page_size`` when given (a config mismatch is an error, as in torch).
    Returns:
        ``Selection.full`` when every sequence's valid tokens fit in the budget (as the torch selector returns).
        Otherwise a `Selection` ``[B, Hkv, n_pages * page_size]``: the last page (the current one, usually
        partial) and the ``n_pages - 1`` other pages with the highest bound of ``q·k`` among those holding a valid
        token (pages wholly in left padding score ``-inf`` and are never taken; every valid page when there are
        fewer), expanded to their valid tokens: the others in page order, then the last page. Without left padding
        the valid tokens are whole pages followed by the partial last one; with it, each row's valid tokens are
        compacted to its front. The torch selector's set, up to the order of float32 sums in near-ties.

    Example::

        >>> sel = quest_select(q, cache, token_budget=4096)   # q [B, Hq, D] on the cache's device
        >>> sel.indices.shape, sel.counts.shape
        (torch.Size([B, Hkv, 4096]), torch.Size([B, Hkv]))
    """
    if page_size is not None and page_size != cache.page_size:
        raise ValueError(f"selector.page_size={page_size} differs from the cache's page_size={cache.page_size}")
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget={token_budget!r} must be an integer >= 1")
    check_q(q, cache)
    if cache.length - cache.min_start <= token_budget:
        return Selection.full(cache.batch, cache.num_kv_heads, cache.length, device=cache.device, start=cache.start)
    n_pages = min(-(-token_budget // cache.page_size), cache.num_pages)
    scores = quest_page_scores(q, cache)
    return _top_pages(scores, cache, n_pages, row_budget=-1, force_last=True)
