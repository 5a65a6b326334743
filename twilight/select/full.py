"""``full``: every valid token (the selector of the dense and ``twilight`` presets)."""
from __future__ import annotations

from twilight.select.base import _full
from twilight.select.registry import SelectorSpec, register_selector


def _build(cfg, layer_idx: int = 0, num_layers: int | None = None):
    return _full


register_selector(SelectorSpec(name="full", build=_build, picks="every valid token", gqa="equal",
                               legacy_names=("none", "dense")))
