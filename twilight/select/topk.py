"""Top tokens by ``q·k``: ``oracle_topk`` (exact ``q·k``, a research baseline that reads all of K) and ``sparq``
(SparQ's approximate ``q·k``: each query head scores with its ``num_channels`` (``r``) channels of largest ``|q|``,
scaled by ``1/sqrt(head_dim)``, not ``1/sqrt(r)``, as SparQ does)."""
from __future__ import annotations

import torch

from twilight._tensors import group_queries
from twilight.cache import LayerCache
from twilight.config import _MISSING, SelectorConfig, _check_int, _take
from twilight.contract import StepPlan
from twilight.select.base import _full, _group_or_heads, _masked, _topk_tokens, exact_group_scores, exact_head_scores
from twilight.select.registry import SelectorSpec, register_selector
from twilight.selection import Selection


class _OracleTopK:
    def __init__(self, cfg: SelectorConfig):
        self.budget, self.gqa = cfg.token_budget, cfg.gqa

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        scores = exact_head_scores(q, cache) if self.gqa == "head" else exact_group_scores(q, cache)
        return _topk_tokens(scores, cache, self.budget, plan)


class _SparQ:
    def __init__(self, cfg: SelectorConfig):
        self.budget, self.r, self.gqa = cfg.token_budget, cfg.num_channels, cfg.gqa

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        qg = group_queries(q, cache).float()  # [B, Hkv, G, D]
        B, H, G, D = qg.shape
        if self.r > D:
            raise ValueError(f"selector.num_channels={self.r} is invalid for sparq: must be <= head_dim={D}")
        if cache.length - cache.min_start <= self.budget:
            return _full(q, cache)
        channels = qg.abs().topk(self.r, dim=-1).indices  # [B, Hkv, G, r]: each query head's own channels
        q_r = qg.gather(-1, channels)
        L = cache.length
        k_r = cache.keys().unsqueeze(2).expand(B, H, G, L, D).gather(
            -1, channels.unsqueeze(3).expand(B, H, G, L, self.r)).float()  # [B, Hkv, G, L, r]: r channels, then f32
        scores = _group_or_heads(torch.einsum("bhgr,bhglr->bhgl", q_r, k_r), self.gqa) * D ** -0.5
        return _topk_tokens(_masked(scores, cache), cache, self.budget, plan)


def _sparq_from_legacy(section: dict) -> None:
    """SparQ's ``r``: the query channels it scores with."""
    name, r = _take(section, "selector", "num_channels", "r")
    if r is not _MISSING:
        section["num_channels"] = _check_int(f"selector.{name}", r, 1)


def _check_num_channels(cfg: SelectorConfig) -> None:
    _check_int("selector.num_channels", cfg.num_channels, 1)


register_selector(SelectorSpec(
    name="oracle_topk", build=lambda cfg, layer_idx=0, num_layers=None: _OracleTopK(cfg),
    picks="top tokens by exact `q·k` (research baseline)", gqa="both", legacy_names=("oracle",)))
register_selector(SelectorSpec(
    name="sparq", build=lambda cfg, layer_idx=0, num_layers=None: _SparQ(cfg),
    picks="top tokens by `q·k` over each query head's `num_channels` channels of largest `\\|q\\|`, scaled by "
          "`1/sqrt(head_dim)` (SparQ)",
    gqa="both", fields=("num_channels",), fields_doc="`num_channels` (SparQ's `r`)",
    check_fields=_check_num_channels, from_legacy=_sparq_from_legacy))
