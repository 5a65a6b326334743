"""``quest``: the pages with the highest upper bound of ``q·k`` (Quest), ``token_budget`` tokens in all (rounded up
to whole pages); the most recent page, partial or not, is always among them, as Quest and the original Twilight
code attend to the current page, and it comes last. Its cache keeps each page's per-channel key min and max
(``keep_page_bounds``)."""
from __future__ import annotations

import torch

from twilight._tensors import compact, group_queries, valid_positions
from twilight.cache import LayerCache
from twilight.config import SelectorConfig, _check_int
from twilight.contract import StepPlan
from twilight.select.base import _full, _head_selection, _width
from twilight.select.registry import SelectorSpec, register_selector
from twilight.selection import Selection

__all__ = ["quest_page_scores", "pages_with_tokens", "last_pages"]


def quest_page_scores(q: torch.Tensor, cache: LayerCache, per_head: bool = False) -> torch.Tensor:
    """Quest's upper bound of ``max over the group's query heads of q·k`` per page: ``[B, Hkv, pages]``; with
    ``per_head``, each query head's own bound of its ``q·k``: ``[B, Hkv, G, pages]`` (``gqa="head"``).

    For each channel, ``max(q_d * max_d, q_d * min_d) = relu(q_d) * max_d + min(q_d, 0) * min_d``, so the
    bound of all pages is one batched matmul of ``[max | min]`` with ``[relu(q) | min(q, 0)]``.
    Pages holding no valid token score ``-inf``.
    """
    qg = group_queries(q, cache)  # [B, Hkv, G, D]
    cache.update_derived()
    B, H, G, D = qg.shape
    P = cache.num_pages
    bounds = cache.page_bounds[:, :, :P].reshape(B * H, P, 2 * D)  # [max | min] per page
    # In float32 whatever the cache and bounds dtypes, q never rounded to the bounds': every backend computes these
    # same products (exact in float32) and sums, so they pick the same pages.
    qq = torch.cat([qg.clamp_min(0), qg.clamp_max(0)], -1).reshape(B * H, G, 2 * D).float()
    # [G, 2D] @ [2D, P] (pages as the wide dimension) runs ~2x faster on CPU than [P, 2D] @ [2D, G]
    scores = torch.bmm(qq, bounds.float().transpose(1, 2)).view(B, H, G, P)
    if not per_head:
        scores = scores.amax(2)  # [B, Hkv, P]
    if cache.max_start == 0:  # no padding: every page up to the last holds valid tokens
        return scores
    empty = ~pages_with_tokens(cache)  # [B, P]
    return scores.masked_fill(empty.view(B, 1, 1, P) if per_head else empty.unsqueeze(1), float("-inf"))


def pages_with_tokens(cache: LayerCache) -> torch.Tensor:
    """``[B, pages]`` bool: which of each sequence's pages (cut from its first valid token, ``cache.page_offset``)
    hold a valid token. Left padding fills the pages before ``start // page_size``; a sequence whose grid is
    offset may end one page before the others."""
    ps = cache.page_size
    page = torch.arange(cache.num_pages, device=cache.device).view(1, -1)
    return (page >= (cache.start // ps).view(-1, 1)) & (page * ps + cache.page_offset.view(-1, 1) < cache.length)


def last_pages(cache: LayerCache) -> torch.Tensor:
    """``[B]`` int64: each sequence's most recent page (the one holding position ``length - 1``)."""
    return (cache.length - 1 - cache.page_offset.long()).div(cache.page_size, rounding_mode="floor")


class _Quest:
    def __init__(self, cfg: SelectorConfig):
        # read by the backends' fused Quest kernels too (Backend.select_kernels["quest"], gqa="group" only)
        self.budget, self.page_size, self.gqa = cfg.token_budget, cfg.page_size, cfg.gqa

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan, page_scores=quest_page_scores) -> Selection:
        """``page_scores(q, cache) -> [B, Hkv, pages]``: the page bounds' scores (a backend passes its own kernel
        for ``quest_page_scores``; the rest of the selection is the same for every backend that uses this)."""
        if cache.page_size != self.page_size:
            raise ValueError(f"selector.page_size={self.page_size} differs from the cache's "
                             f"page_size={cache.page_size}")
        if cache.length - cache.min_start <= self.budget:
            return _full(q, cache)
        ps = self.page_size
        n_pages = min(-(-self.budget // ps), cache.num_pages)
        if self.gqa == "head" and q.shape[1] > cache.num_kv_heads:  # (one query head per kv-head: the same)
            return self._per_head(q, cache, n_pages, plan)
        tile = torch.arange(ps, device=q.device, dtype=torch.int32)
        if cache.max_start == 0:  # no padding: pages at multiples of ps, the valid tokens a prefix of the row
            last = cache.num_pages - 1  # the most recent page: always kept, and last
            scores = page_scores(q, cache)[..., :last]  # [B, Hkv, P - 1]
            pages = torch.topk(scores, n_pages - 1, dim=-1, sorted=False).indices.to(torch.int32)
            pages = torch.cat([pages, pages.new_full((*pages.shape[:2], 1), last)], -1)  # [B, Hkv, n_pages]
            tokens = (pages.unsqueeze(-1) * ps + tile).flatten(-2)
            n = (n_pages - 1) * ps + cache.length - last * ps
            counts = torch.full(pages.shape[:2], n, dtype=torch.int32, device=q.device)
            return Selection(tokens.contiguous(), counts, page_size=ps, uniform_count=n)
        # Left padding: each sequence's pages start at its first valid token (cache.page_offset), so its last page
        # is its own; pages holding no valid token score -inf and are taken only when a sequence has fewer valid
        # pages than the budget (their positions are dropped below).
        B, H = cache.batch, cache.num_kv_heads
        last = last_pages(cache).view(B, 1, 1).expand(B, H, 1)
        scores = page_scores(q, cache).scatter(-1, last, float("-inf"))  # the last page does not compete
        pages = torch.topk(scores, n_pages - 1, dim=-1, sorted=False).indices
        pages = pages.masked_fill(pages == last, cache.num_pages)  # a -inf tie: a page past the end, dropped below
        pages = torch.cat([pages, last], -1).to(torch.int32)  # [B, Hkv, n_pages], the last page last
        offset = cache.page_offset.view(B, 1, 1, 1)
        tokens = (pages.unsqueeze(-1) * ps + offset + tile).flatten(-2)
        out, counts = compact(tokens, valid_positions(cache, tokens), width=_width(plan, tokens.shape[-1]))
        return Selection(out, counts)

    def _per_head(self, q: torch.Tensor, cache: LayerCache, n_pages: int, plan) -> Selection:
        """``gqa="head"``: each query head's own ``n_pages`` pages (its last page and the ``n_pages - 1`` others of
        highest bound of its own ``q·k``), as their union per kv-head with ``head_mask``."""
        scores = quest_page_scores(q, cache, per_head=True)  # [B, Hkv, G, P]
        B, H, G, P = scores.shape
        ps, L = self.page_size, cache.length
        last = last_pages(cache).view(B, 1, 1, 1).expand(B, H, G, 1)
        scores = scores.scatter(-1, last, float("-inf"))  # the last page does not compete: it is always kept
        top = torch.topk(scores, n_pages - 1, dim=-1, sorted=False)
        chosen = torch.zeros(B, H, G, P, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, top.indices, top.values > float("-inf"))  # pages without a valid token: never
        chosen.scatter_(-1, last, True)
        pos = torch.arange(L, device=q.device)
        page = (pos.view(1, L) - cache.page_offset.view(B, 1).long()).div(ps, rounding_mode="floor")  # [B, L]
        mask = chosen.gather(-1, page.clamp(0, P - 1).view(B, 1, 1, L).expand(B, H, G, L))
        mask &= valid_positions(cache, pos.view(1, 1, L)).unsqueeze(2)
        return _head_selection(mask, plan, G * n_pages * ps)


def _check_fields(cfg: SelectorConfig) -> None:
    _check_int("selector.page_size", cfg.page_size, 1)


register_selector(SelectorSpec(
    name="quest", build=lambda cfg, layer_idx=0, num_layers=None: _Quest(cfg),
    picks="pages with the highest upper bound of `q·k` (Quest)", gqa="both", fields=("page_size",),
    check_fields=_check_fields, cache_needs=lambda cfg, layer_idx, num_kv_heads: {"keep_page_bounds": True}))
