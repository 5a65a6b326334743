"""Select: coarse candidate sets, one `Selection` per decode step.

Every selector is a callable ``selector(q, cache, plan) -> Selection`` built by
``make_selector(cfg, layer_idx)`` from its registered `SelectorSpec` (``twilight.select.registry``; one module per
selector registers it: ``full``, ``quest``, ``streaming``, ``double_sparse``, ``topk`` (``oracle_topk``,
``sparq``), ``tidal``, ``prefill`` (``snapkv``, ``h2o``)), with ``q [B, Hq, D]`` the step's queries, ``cache`` a
``LayerCache`` and ``plan`` the step's ``twilight.contract.StepPlan`` (``plan.host_reads`` false: output widths
are host-known, no count is read back from the device). Selections are per kv-head
(``Selection.indices [B, Hkv, K]``); how a kv-head's query heads share them is ``selector.gqa``:

- ``"group"`` (default): a token is a candidate for the whole group, scored by the largest score any query head
  of the group gives it, and ``token_budget`` counts tokens per kv-head.
- ``"head"`` (the original Twilight code's semantics: it repeats K/V per query head before selecting): each query
  head selects its own ``token_budget`` tokens by its own score; the ``Selection`` holds their union per kv-head
  (K/V are read once per kv-head) and ``Selection.head_mask`` says which of them each query head selected, so that
  each query head prunes and attends to its own selection only. ``full`` and ``streaming`` score nothing: their
  selection is the same for every query head in both modes (no ``head_mask``); ``h2o`` is ``"group"`` only.

- ``full``: every valid token.
- ``quest``: the pages with the highest upper bound of ``q·k`` (Quest), ``token_budget`` tokens in all
  (rounded up to whole pages); the most recent page, partial or not, is always among them, as Quest and the
  original Twilight code attend to the current page, and it comes last.
- ``streaming``: ``sink_tokens`` first tokens plus the ``window`` most recent (StreamingLLM).
- ``double_sparse``: top tokens by ``q·k`` over ``num_channels`` calibrated label channels per kv-head
  (Double Sparsity), read from ``channels_path`` (see ``twilight.select.double_sparse``); with
  ``label_bits`` the key labels are min-max quantized per token first, as the original code does.
- ``oracle_topk``: top tokens by exact ``q·k`` (research baseline; reads all of K).
- ``sparq``: top tokens by SparQ's approximate ``q·k``: each query head scores with its ``num_channels`` (``r``)
  channels of largest ``|q|``, scaled by ``1/sqrt(head_dim)`` (not ``1/sqrt(r)``), as SparQ does.
- ``tidal``: TidalDecode. The ``reselection_layers`` attend to every token and pick the top ``token_budget``
  tokens by exact ``q·k``; every later layer of the same step reuses that selection (handed over in the step's
  ``StepPlan.shared``); layers before the first re-selection layer attend to every token.
- ``snapkv``, ``h2o``: selectors that watch the prefill (``twilight.select.prefill``): SnapKV's prompt tokens
  voted by an observation window, H2O's heavy hitters by accumulated attention plus a recent window.

Under ``gqa="group"`` a token-level selector scores a token for a kv-head by the largest score any of its query
heads gives it (``sparq``, ``tidal``, ``oracle_topk``, ``double_sparse``): each query head's channels are its own.
Under ``gqa="head"`` each query head takes the top ``token_budget`` tokens (Quest: the top pages) of its own scores.
"""
from __future__ import annotations

import torch

# The selector modules register themselves on import, in this order (SELECTOR_TYPES's).
from twilight.select import full, quest, streaming, double_sparse, topk, tidal, prefill  # noqa: F401  (isort: skip)
from twilight.config import GQA_MODES, SelectorConfig
from twilight.select.base import exact_group_scores, exact_head_scores
from twilight.select.quest import last_pages, pages_with_tokens, quest_page_scores
from twilight.select.registry import SELECTORS, SelectorSpec, register_selector, registered, unregister_selector

__all__ = ["make_selector", "quest_page_scores", "pages_with_tokens", "last_pages", "exact_group_scores",
           "exact_head_scores", "observation_key", "SELECTOR_TYPES", "selector_channels", "selector_cache_needs",
           "check_model", "SelectorSpec", "register_selector", "unregister_selector", "registered"]

#: What ``selector_cache_needs`` may ask of a ``LayerCache`` (its keyword arguments).
CACHE_NEEDS = ("keep_page_bounds", "label_channels", "label_bits")


def __getattr__(name: str):
    if name == "SELECTOR_TYPES":  # the registered selectors now
        return tuple(SELECTORS)
    raise AttributeError(f"module 'twilight.select' has no attribute {name!r}")


def _spec(cfg: SelectorConfig) -> SelectorSpec:
    spec = SELECTORS.get(cfg.type) if isinstance(cfg.type, str) else None
    if spec is None:
        raise ValueError(f"selector.type={cfg.type!r} is invalid: must be one of {', '.join(SELECTORS)}")
    return spec


def make_selector(cfg: SelectorConfig, layer_idx: int = 0, num_layers: int | None = None):
    """The selector callable for ``cfg`` (``layer_idx`` picks double_sparse's calibrated channels and tidal's role;
    tidal's default re-selection layers depend on ``num_layers``)."""
    if cfg.gqa not in GQA_MODES:  # a SelectorConfig built without validation: never run a mode it did not ask for
        raise ValueError(f"selector.gqa={cfg.gqa!r} is invalid: must be one of {', '.join(GQA_MODES)}")
    return _spec(cfg).build(cfg, layer_idx, num_layers)


def observation_key(config) -> tuple | None:
    """What a ``TwilightConfig``'s selector records while watching a prompt (``None``: nothing). Configs with equal
    keys can decode from one prefilled cache (``twilight.integrations.hf.fork_cache``); budgets may differ."""
    sel = config.selector
    spec = SELECTORS.get(sel.type) if isinstance(sel.type, str) else None
    if config.is_dense or spec is None or spec.observes is None:
        return None
    return sel.type, spec.observes(sel), tuple(sorted(config.dense_layers))


def selector_cache_needs(cfg: SelectorConfig, layer_idx: int, num_kv_heads: int | None = None) -> dict:
    """What a sparse layer's ``LayerCache`` must keep for ``cfg``'s selector: keyword arguments of ``LayerCache``
    among ``CACHE_NEEDS`` (Quest: ``keep_page_bounds``; double_sparse: ``label_channels``, ``label_bits``)."""
    spec = _spec(cfg)
    needs = {} if spec.cache_needs is None else dict(spec.cache_needs(cfg, layer_idx, num_kv_heads))
    unknown = sorted(set(needs) - set(CACHE_NEEDS))
    if unknown:
        raise ValueError(f"selector {cfg.type!r} asks the cache for {unknown}: a cache keeps only {CACHE_NEEDS}")
    return needs


def selector_channels(cfg: SelectorConfig, layer_idx: int, num_kv_heads: int | None = None) -> torch.Tensor | None:
    """The label channels ``[Hkv, num_channels]`` a cache must keep for ``cfg`` (double_sparse only).

    Read from ``cfg.channels_path`` (``cfg.channels_key`` picks a DoubleSparse file's projection); with
    ``num_kv_heads`` the file must have one row per kv-head. The cache's ``label_bits`` should be
    ``cfg.label_bits``.
    """
    return selector_cache_needs(cfg, layer_idx, num_kv_heads).get("label_channels")


def check_model(config, num_layers: int) -> None:
    """Raise ``ConfigError`` when the sparse ``TwilightConfig``'s selector cannot run on a model of ``num_layers``
    layers (tidal: its re-selection layers must exist and not be dense)."""
    spec = _spec(config.selector)
    if spec.check_model is not None:
        spec.check_model(config, num_layers)
