"""What the selector modules share: the full selection, top-k of token scores (per kv-head or per query head), exact
``q·k`` scores, and the host-known width of a compaction."""
from __future__ import annotations

import torch

from twilight._tensors import compact, compact_heads, group_queries, valid_positions
from twilight.cache import LayerCache
from twilight.contract import StepPlan
from twilight.selection import Selection

__all__ = ["exact_group_scores", "exact_head_scores"]


def _width(plan, n: int) -> int | None:
    """``compact``'s width: read from the counts (``None``) when the plan allows host reads, else ``n``."""
    return None if plan.host_reads else n


def _full(q: torch.Tensor | None, cache: LayerCache, plan: StepPlan | None = None) -> Selection:
    """Every valid token (needs no plan: its width is the length, known on the host)."""
    return Selection.every_valid(cache)


def _head_selection(mask: torch.Tensor, plan, bound: int) -> Selection:
    """Per-query-head selections ``mask [B, Hkv, G, L]`` (each query head's positions) as a `Selection`: their
    union per kv-head, with ``head_mask``. ``bound``: an upper bound of a union's size (the host-known width)."""
    B, H, G, L = mask.shape
    pos = torch.arange(L, device=mask.device, dtype=torch.int32).expand(B, H, L)
    out, counts, head_mask = compact_heads(pos, mask, width=_width(plan, max(min(L, bound), 1)))
    return Selection(out, counts, head_mask=head_mask)


def _topk_tokens(scores: torch.Tensor, cache: LayerCache, budget: int, plan: StepPlan) -> Selection:
    """Top ``budget`` positions per kv-head from token scores ``[B, Hkv, L]`` (invalid positions -inf); from per
    query head scores ``[B, Hkv, G, L]`` (``gqa="head"``), each query head's own top ``budget``, as their union with
    ``head_mask``."""
    if budget >= cache.length:
        return _full(None, cache)
    if scores.dim() == 4 and scores.shape[2] == 1:  # one query head per kv-head: both modes are the same selection
        scores = scores.squeeze(2)
    if scores.dim() == 4:
        top = torch.topk(scores, budget, dim=-1, sorted=False)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(-1, top.indices, top.values > float("-inf"))  # invalid positions score -inf: never kept
        return _head_selection(mask, plan, scores.shape[2] * budget)
    idx = torch.topk(scores, budget, dim=-1, sorted=False).indices
    valid = valid_positions(cache, idx) & (scores.gather(-1, idx) > float("-inf"))
    out, counts = compact(idx, valid, width=budget)
    return Selection(out, counts)


def _masked(scores: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Token scores ``[B, Hkv, L]`` (or ``[B, Hkv, G, L]``) with positions outside each sequence's valid range at
    ``-inf``."""
    pos = torch.arange(cache.length, device=scores.device).view(1, 1, -1)
    valid = valid_positions(cache, pos)  # [B, 1, L]
    return scores.masked_fill(~(valid.unsqueeze(2) if scores.dim() == 4 else valid), float("-inf"))


def _group_or_heads(scores: torch.Tensor, gqa: str) -> torch.Tensor:
    """Per query head scores ``[B, Hkv, G, L]``: as they are (``gqa="head"``), or the group's max ``[B, Hkv, L]``."""
    return scores if gqa == "head" else scores.amax(2)


def exact_head_scores(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Each query head's exact ``q·k``: ``[B, Hkv, G, L]`` float32, ``-inf`` off range."""
    qg = group_queries(q, cache).float()
    return _masked(torch.einsum("bhgd,bhld->bhgl", qg, cache.keys().float()), cache)


def exact_group_scores(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """max over each kv-head's query heads of the exact ``q·k``: ``[B, Hkv, L]`` float32, ``-inf`` off range."""
    qg = group_queries(q, cache).float()
    return _masked(torch.einsum("bhgd,bhld->bhgl", qg, cache.keys().float()).amax(2), cache)
