"""``streaming``: ``sink_tokens`` first tokens plus the ``window`` most recent (StreamingLLM)."""
from __future__ import annotations

import torch

from twilight._tensors import compact
from twilight.cache import LayerCache
from twilight.config import SelectorConfig, _check_int
from twilight.contract import StepPlan
from twilight.select.base import _full, _width
from twilight.select.registry import SelectorSpec, register_selector
from twilight.selection import Selection


class _Streaming:
    def __init__(self, cfg: SelectorConfig):
        self.sinks, self.window = cfg.sink_tokens, cfg.window

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        B, H, L = cache.batch, cache.num_kv_heads, cache.length
        pos = torch.arange(L, device=cache.device).view(1, 1, L)
        start = cache.start.view(-1, 1, 1)
        if self.sinks + self.window >= L:
            return _full(q, cache)
        keep = ((pos < start + self.sinks) | (pos >= L - self.window)) & (pos >= start)
        out, counts = compact(pos.expand(B, 1, L), keep, width=_width(plan, min(L, self.sinks + self.window)))
        return Selection(out.expand(B, H, -1).contiguous(), counts.expand(B, H).contiguous())


def _check_fields(cfg: SelectorConfig) -> None:
    _check_int("selector.sink_tokens", cfg.sink_tokens, 0)
    _check_int("selector.window", cfg.window, 1)


register_selector(SelectorSpec(
    name="streaming", build=lambda cfg, layer_idx=0, num_layers=None: _Streaming(cfg),
    picks="sink tokens and a recent window (StreamingLLM; no `token_budget`)", gqa="equal",
    fields=("sink_tokens", "window"), check_fields=_check_fields, legacy_names=("streamingllm",)))
