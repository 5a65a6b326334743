"""``tidal``: TidalDecode. The ``reselection_layers`` attend to every token and pick the top ``token_budget`` tokens
by exact ``q·k``; every later layer of the same step reuses that selection (handed over in the step's
``StepPlan.shared``); layers before the first re-selection layer attend to every token."""
from __future__ import annotations

from typing import Sequence

import torch

from twilight._tensors import compact, compact_heads, valid_positions
from twilight.cache import LayerCache
from twilight.config import ConfigError, SelectorConfig, _check_int, _fail
from twilight.contract import StepPlan
from twilight.select.base import _full, _topk_tokens, _width, exact_group_scores, exact_head_scores
from twilight.select.registry import SelectorSpec, register_selector
from twilight.selection import Selection


class _Tidal:
    """TidalDecode's position-persistent selection: one per ``layer_idx`` (see the module docstring)."""

    SHARED_KEY = "tidal"

    def __init__(self, cfg: SelectorConfig, layer_idx: int, reselection_layers: list[int]):
        self.budget, self.layer_idx, self.gqa = cfg.token_budget, layer_idx, cfg.gqa
        self.reselects = layer_idx in reselection_layers
        self.before_first = layer_idx < min(reselection_layers)

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        if self.reselects:
            scores = exact_head_scores(q, cache) if self.gqa == "head" else exact_group_scores(q, cache)
            sel = _topk_tokens(scores, cache, self.budget, plan)
            plan.shared[self.SHARED_KEY] = (sel, cache.min_start, cache.max_start)
            return _full(q, cache)
        if self.before_first:
            return _full(q, cache)
        shared = plan.shared.get(self.SHARED_KEY)
        if shared is None:
            raise ValueError(f"tidal: layer {self.layer_idx} reuses the tokens of the last re-selection layer, which "
                             "did not run with this step's plan: pass the same plan (TwilightPipeline.plan(cache)) to "
                             "every layer of a decode step, in layer order")
        sel, min_start, max_start = shared
        if sel.indices.device != q.device:
            sel = Selection(sel.indices.to(q.device), sel.counts.to(q.device),
                            head_mask=None if sel.head_mask is None else sel.head_mask.to(q.device))
        if (min_start, max_start) != (cache.min_start, cache.max_start):  # a sliding-window layer: stay inside it
            keep = sel.valid() & valid_positions(cache, sel.indices)
            if sel.head_mask is None:
                sel = Selection(*compact(sel.indices, keep, width=_width(plan, sel.k_max)))
            else:
                out, counts, head_mask = compact_heads(sel.indices, sel.head_mask & keep.unsqueeze(2),
                                                       width=_width(plan, sel.k_max))
                sel = Selection(out, counts, head_mask=head_mask)
        return sel


def _build(cfg: SelectorConfig, layer_idx: int = 0, num_layers: int | None = None) -> _Tidal:
    if cfg.reselection_layers is None and num_layers is None:
        raise ValueError("tidal's default re-selection layers depend on the model's depth: pass num_layers or "
                         "set selector.reselection_layers")
    return _Tidal(cfg, layer_idx, cfg.default_reselection_layers(num_layers or 0))


def _check_fields(cfg: SelectorConfig) -> None:
    layers = cfg.reselection_layers
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            _fail("selector.reselection_layers", layers, "must be null (the default layers) or a non-empty "
                  "list of layer indices >= 0")
        cfg.reselection_layers = sorted({_check_int("selector.reselection_layers[]", i, 0) for i in layers})


def _check_model(config, num_layers: int) -> None:
    """Every re-selection layer must exist and run the tidal selector (not be in ``dense_layers``)."""
    layers = config.selector.default_reselection_layers(num_layers)
    bad = [i for i in layers if i >= num_layers or i in config.dense_layers]
    if bad:
        raise ConfigError(f"selector.reselection_layers={layers} is invalid for this model: layer(s) {bad} "
                          f"are beyond its {num_layers} layers or in dense_layers={config.dense_layers} "
                          "(a re-selection layer must run the tidal selector)")


register_selector(SelectorSpec(
    name="tidal", build=_build,
    picks="re-selection layers attend to every token and pick the top tokens by exact `q·k`; the following layers "
          "reuse them (TidalDecode), handed over in the step's plan",
    gqa="both", fields=("reselection_layers",),
    fields_doc="`reselection_layers` (default 2 and `round(13/32 * layers)`)",
    check_fields=_check_fields, legacy_names=("tidal_decode",), check_model=_check_model))
