"""Quest in Triton: page upper bounds of ``q·k`` and the top-page candidate `Selection`.

- ``quest_page_scores(q, cache) -> [B, Hkv, pages]`` float32: for each page, the upper bound of
  ``max over the GQA group of q·k`` from the page's channel-wise ``[max | min]`` (``cache.page_bounds``);
  ``-inf`` for pages holding no valid token. Same definition as ``twilight.select.quest_page_scores``.
- ``quest_select(q, cache, token_budget, page_size=None) -> Selection``: the ``ceil(budget / page_size)``
  best pages per kv-head, expanded to their valid tokens (in page order) — Quest's candidate set — computed
  without sorting: an exact bitwise binary search for the k-th largest page score, then a prefix-sum
  compaction, all in one program per (batch, kv-head).
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
_PAGE_BLOCK = 1024  # page scores per step of the top-page search
_EXPAND_TOKENS = 2048  # tokens written per step when expanding the chosen pages (keeps registers unspilled)


@triton.jit
def _quest_scores_kernel(q_ptr, bounds_ptr, start_ptr, out_ptr, P, H, G, bounds_row_stride, page_size,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                         DOT_F32: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = tl.arange(0, BLOCK_G)
    p_ok = offs_p < P
    d_ok = offs_d < D
    g_ok = offs_g < G
    # The group's queries [BLOCK_G, BLOCK_D], cast to the bounds' dtype as the torch reference does.
    # q arrives in the bounds' dtype; compare in float32 (the interpreter mis-compares bf16).
    q = tl.load(q_ptr + (row * G + offs_g)[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    q_pos = tl.where(q > 0, q, 0.0).to(bounds_ptr.dtype.element_ty)
    q_neg = tl.where(q < 0, q, 0.0).to(bounds_ptr.dtype.element_ty)
    start = tl.load(start_ptr + row // H)
    has_valid = offs_p * page_size + page_size > start  # pages wholly in left padding have +-inf bounds: skip
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
        Unlike the torch reference (whose bf16 matmul rounds the result to bf16) the sums stay float32.

    Example::

        >>> cache = LayerCache(1, 2, 64, device="cuda", dtype=torch.float16)
        >>> cache.append(*(torch.randn(2, 1, 2, 100, 64, device="cuda", dtype=torch.float16)))
        >>> quest_page_scores(torch.randn(1, 8, 64, device="cuda", dtype=torch.float16), cache).shape
        torch.Size([1, 2, 7])
    """
    G = check_q(q, cache)
    if not cache.keep_page_bounds:
        raise ValueError("quest needs a cache built with keep_page_bounds=True (the per-page key bounds)")
    B, H, D, P = cache.batch, cache.num_kv_heads, cache.head_dim, cache.num_pages
    out = torch.empty(B, H, P, dtype=torch.float32, device=q.device)
    if P == 0:
        return out
    bounds = cache.page_bounds
    if not bounds.is_contiguous():
        bounds = bounds.contiguous()
    q = q.to(bounds.dtype).contiguous()  # round q as the torch reference does (on the host: exact RNE)
    BLOCK_P = 64
    with launch_guard(q):
        _quest_scores_kernel[(B * H, triton.cdiv(P, BLOCK_P))](
            q, bounds, cache.start, out, P, H, G, bounds.stride(1), cache.page_size,
            D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_G=max(16, next_pow2(G)), BLOCK_P=BLOCK_P,
            DOT_F32=dot_in_f32(bounds.dtype), num_warps=4)
    return out


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (signed compare)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _top_pages_kernel(scores_ptr, start_ptr, out_ptr, count_ptr, P, H, n_pages, row_budget, length, page_size,
                      width, BLOCK: tl.constexpr, PS: tl.constexpr, EXPAND: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    start = tl.load(start_ptr + row // H)
    srow = scores_ptr + row.to(tl.int64) * P
    orow = out_ptr + row.to(tl.int64) * width
    offs = tl.arange(0, BLOCK)
    # Pages to take: n_pages; every page with a valid token when there are fewer, or when the sequence's valid
    # tokens fit in the budget anyway.
    n_valid = tl.full([], 0, tl.int32)
    for c0 in range(0, P, BLOCK):
        s = tl.load(srow + c0 + offs, mask=c0 + offs < P, other=_NEG_INF)
        n_valid += tl.sum((s > _NEG_INF).to(tl.int32), axis=0)
    k = tl.where(length - start <= row_budget, n_valid, tl.minimum(n_valid, n_pages))
    # Exact binary search over the ordered int32 keys: the largest T with #{key >= T} >= k (the k-th largest).
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.full([], 0, tl.int32)
        for c0 in range(0, P, BLOCK):
            s = tl.load(srow + c0 + offs, mask=c0 + offs < P, other=_NEG_INF)
            cnt += tl.sum(((_ordered_key(s).to(tl.int64) >= mid) & (s > _NEG_INF)).to(tl.int32), axis=0)
        ok = cnt >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    # Pages strictly above T, then the first pages (by index) tied at T until k are taken.
    n_above = tl.full([], 0, tl.int32)
    for c0 in range(0, P, BLOCK):
        s = tl.load(srow + c0 + offs, mask=c0 + offs < P, other=_NEG_INF)
        n_above += tl.sum(((_ordered_key(s).to(tl.int64) > lo) & (s > _NEG_INF)).to(tl.int32), axis=0)
    ties_left = k - n_above
    # Expand the chosen pages to their valid tokens [max(page_start, start), min(page_end, length)).
    written = tl.full([], 0, tl.int32)
    ties_seen = tl.full([], 0, tl.int32)
    tok = tl.arange(0, PS)
    offs_e = tl.arange(0, EXPAND)  # fewer pages per step here: the [pages, PS] token tile lives in registers
    for c0 in range(0, P, EXPAND):
        pg = c0 + offs_e
        s = tl.load(srow + pg, mask=pg < P, other=_NEG_INF)
        key = _ordered_key(s).to(tl.int64)
        finite = s > _NEG_INF
        tie = (key == lo) & finite
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among tied pages
        take = ((key > lo) & finite) | (tie & (tie_rank <= ties_left))
        ties_seen += tl.sum(tie.to(tl.int32), axis=0)
        first = tl.maximum(pg * page_size, start)
        last = tl.minimum(pg * page_size + page_size, length)
        n_tok = tl.where(take, tl.maximum(last - first, 0), 0)
        slot0 = written + tl.cumsum(n_tok, axis=0) - n_tok  # exclusive prefix sum
        pos = first[:, None] + tok[None, :]  # [BLOCK, PS]
        ok = (tok[None, :] < n_tok[:, None])
        tl.store(orow + slot0[:, None] + tok[None, :], pos.to(tl.int32), mask=ok)
        written += tl.sum(n_tok, axis=0)
    tl.store(count_ptr + row, written)
    # Padding slots hold 0, a valid position.
    for c0 in range((written // BLOCK) * BLOCK, width, BLOCK):
        o = c0 + offs
        tl.store(orow + o, tl.zeros([BLOCK], tl.int32), mask=(o >= written) & (o < width))


def top_pages_to_tokens(scores: torch.Tensor, cache: LayerCache, n_pages: int,
                        row_budget: int | None = None) -> Selection:
    """The ``n_pages`` highest-scoring pages of each row of ``scores [B, Hkv, P]``, as a token `Selection`.

    Pages scoring ``-inf`` are never taken; ties at the k-th score go to the lower page index. Each taken page
    contributes its valid tokens (inside ``[start[b], length)``), in page order. A sequence with at most
    ``row_budget`` valid tokens (default ``n_pages * page_size``) takes all of them. The result has width
    ``n_pages * page_size`` (no host synchronisation); slots past a row's count hold 0.

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
    ps = cache.page_size
    width = n_pages * ps
    row_budget = width if row_budget is None else min(int(row_budget), width)
    out = torch.empty(B, H, width, dtype=torch.int32, device=scores.device)
    counts = torch.empty(B, H, dtype=torch.int32, device=scores.device)
    scores = scores.contiguous()
    BLOCK = min(_PAGE_BLOCK, max(16, next_pow2(P)))
    EXPAND = max(16, min(BLOCK, _EXPAND_TOKENS // next_pow2(ps)))  # pages per expansion step ([EXPAND, PS] tokens)
    with launch_guard(scores):
        _top_pages_kernel[(B * H,)](scores, cache.start, out, counts, P, H, n_pages, row_budget, cache.length, ps,
                                    width, BLOCK=BLOCK, PS=next_pow2(ps), EXPAND=EXPAND, num_warps=4)
    return Selection(out, counts)


def quest_select(q: torch.Tensor, cache: LayerCache, token_budget: int, page_size: int | None = None) -> Selection:
    """Quest's candidate set: the ``ceil(token_budget / page_size)`` best pages of every kv-head, as tokens.

    Args:
        q: ``[B, Hq, D]``; cache: a ``LayerCache`` with page bounds.
        token_budget: candidate tokens per kv-head (Quest's budget).
        page_size: must equal ``cache.page_size`` when given (a config mismatch is an error, as in torch).
    Returns:
        A `Selection` ``[B, Hkv, n_pages * page_size]``. When the whole cache fits in the budget it is
        ``Selection.full`` (as the torch selector returns). Otherwise a sequence whose own valid length fits in
        the budget keeps all its valid tokens, and a longer one its top pages: the torch selector's result up
        to ties in page scores, and for such short left-padded rows possibly one page more of valid tokens.

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
    if cache.length <= token_budget:
        return Selection.full(cache.batch, cache.num_kv_heads, cache.length, device=cache.device, start=cache.start)
    n_pages = min(-(-token_budget // cache.page_size), cache.num_pages)
    scores = quest_page_scores(q, cache)
    return top_pages_to_tokens(scores, cache, n_pages, row_budget=token_budget)
