"""Argument checks shared by the stages (select, estimate, prune, attend) and the kernel wrappers.

Every mistake is a ``ValueError`` that names the argument. The kernel wrappers add their own device and
layout checks on top (``twilight.kernels._validate``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from twilight.cache import LayerCache
    from twilight.selection import Selection


def check_q(q: torch.Tensor, cache: LayerCache) -> int:
    """``q [B, Hq, D]`` matching ``cache`` (same B and D, Hq a multiple of Hkv); returns ``G = Hq // Hkv``."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if B != cache.batch or D != cache.head_dim or Hq % cache.num_kv_heads:
        raise ValueError(f"q must be [B={cache.batch}, Hq (a multiple of Hkv={cache.num_kv_heads}), "
                         f"D={cache.head_dim}], got {tuple(q.shape)}")
    return Hq // cache.num_kv_heads


def group_queries(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """``q [B, Hq, D]``, checked by `check_q`, viewed as ``[B, Hkv, G, D]`` (each kv-head's GQA group)."""
    G = check_q(q, cache)
    return q.view(q.shape[0], cache.num_kv_heads, G, q.shape[2])


def check_selection(sel: Selection, cache: LayerCache) -> None:
    """``sel.indices [B, Hkv, K]`` matching ``cache``'s batch and kv-heads."""
    if tuple(sel.indices.shape[:2]) != (cache.batch, cache.num_kv_heads):
        raise ValueError(f"selection must be [B={cache.batch}, Hkv={cache.num_kv_heads}, K], "
                         f"got {tuple(sel.indices.shape)}")


def check_p(p: float | torch.Tensor, name: str = "p") -> None:
    """``p`` a number in ``(0, 1]`` or a float tensor of such values (top-p mass, or a weight threshold)."""
    if isinstance(p, torch.Tensor):
        if p.is_floating_point() is False:
            raise ValueError(f"{name} must be a float tensor, got {p.dtype}")
        bad = (p <= 0) | (p > 1) | torch.isnan(p)
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in (0, 1]; got values from {p.min().item()} to {p.max().item()}")
    elif isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
        raise ValueError(f"{name}={p!r} is invalid: must be a number in (0, 1]")
