"""Tensor helpers shared by every stage (select, estimate, prune, attend), backend and kernel wrapper.

- checks: ``check_q``, ``group_queries``, ``check_selection``, ``check_p``. Every mistake is a ``ValueError``
  that names the argument; the kernel wrappers add device and layout checks (``twilight.kernels._validate``).
- data movement: ``gather_tokens`` (rows of a per-(batch, kv-head) store), ``compact`` (kept entries to the
  front of each row, without sorting), ``compact_heads`` (the same for per-query-head selections: the union per
  kv-head, with each query head's own entries), ``valid_positions`` (inside each sequence's ``[start, length)``).

This module imports no stage, so stages and backends depend on it and never on each other's privates.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from twilight._compat import INDEX_DTYPE

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


def gather_tokens(store: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of ``store [B, H, capacity, X]`` at ``indices [B, H, K]`` -> ``[B, H, K, X]``.

    One ``index_select`` over the flattened rows (much faster than ``torch.gather`` on CPU).
    """
    B, H, cap, X = store.shape
    dtype = torch.int32 if B * H * cap < 2**31 else torch.int64
    base = torch.arange(B * H, device=store.device, dtype=dtype).view(B, H, 1) * cap
    flat = (indices.to(dtype) + base).reshape(-1)
    return store.reshape(B * H * cap, X).index_select(0, flat).view(B, H, -1, X)


def compact(values: torch.Tensor, keep: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept entries of each row to its front, in order, without sorting.

    Args:
        values: ``[..., N]`` int tensor; keep: ``[..., N]`` bool.
        width: output width. ``None`` reads the largest row count from the tensor (a host read: a device
            synchronisation on CUDA); pass an upper bound (e.g. ``N``) to stay on the device.
    Returns:
        ``(out [..., width] int32, counts [...] int32)``; slots past a row's count repeat its first kept
        value (or 0), so they are always valid positions.
    """
    counts = keep.sum(-1, dtype=torch.int32)
    if width is None:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
    slot = torch.cumsum(keep, -1, dtype=torch.int32) - 1
    slot = torch.where(keep, slot, width).to(INDEX_DTYPE)  # dropped entries land in a spill column
    out = torch.zeros(*values.shape[:-1], width + 1, dtype=torch.int32, device=values.device)
    out.scatter_(-1, slot, values.to(torch.int32))
    out = out[..., :width]
    pad = torch.arange(width, device=values.device) >= counts.unsqueeze(-1)
    out = torch.where(pad, out[..., :1], out)
    return out.contiguous(), counts


def compact_heads(indices: torch.Tensor, keep: torch.Tensor, width: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`compact` for per-query-head selections (``selector.gqa="head"``): each kv-head keeps the union of its query
    heads' entries, and each query head's own entries are carried along.

    Args:
        indices: ``[B, H, K]`` int positions; keep: ``[B, H, G, K]`` bool, which entries each of the ``G`` query
            heads of a kv-head keeps. width: as in `compact` (``None``: read from the counts; a host read).
    Returns:
        ``(out [B, H, width] int32, counts [B, H] int32, head_mask [B, H, G, width] bool)``: the union compacted
        in order (padding as in `compact`), and which of its slots each query head kept (False at padding).
    """
    B, H, G, K = keep.shape
    slots, counts = compact(torch.arange(K, device=keep.device).expand(B, H, K), keep.any(2), width=width)
    slots = slots.to(INDEX_DTYPE)
    out = indices.gather(-1, slots).to(torch.int32).contiguous()
    inside = torch.arange(slots.shape[-1], device=keep.device) < counts.unsqueeze(-1)  # [B, H, width]
    head_mask = keep.gather(-1, slots.unsqueeze(2).expand(B, H, G, -1)) & inside.unsqueeze(2)
    return out, counts, head_mask


def valid_positions(cache: LayerCache, positions: torch.Tensor) -> torch.Tensor:
    """Bool: ``positions [B, H, N]`` inside each sequence's valid range ``[start, length)``."""
    return (positions >= cache.start.view(-1, 1, 1)) & (positions < cache.length)


# exp(z) is a subnormal float32 below this; such weights are flushed to 0 (their mass is < N * 1e-38), since
# arithmetic on subnormals is ~30x slower on x86 CPUs and a softmax over thousands of tokens makes many.
_EXP_FLUSH = -87.0


def exp_weights(logits: torch.Tensor) -> torch.Tensor:
    """``exp(logits - rowmax)`` in float32: in ``[0, 1]``, 0 for ``-inf``, all 0 for an empty row.

    Weights that would be subnormal (``logits - rowmax < -87``) are flushed to 0: softmax numerators without
    the ~30x slowdown subnormal arithmetic costs on x86 CPUs.
    """
    x = logits.float()
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = x - m
    return torch.exp(z.masked_fill_(z < _EXP_FLUSH, float("-inf")))
