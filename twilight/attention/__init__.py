"""Attend: decode attention over a `Selection` with the exact K/V.

``sparse_decode_attention(q, cache, sel, scale)`` gathers each kv-head's selected keys and values once and
lets every query head of its GQA group attend to them. A full-range selection (``Selection.full``) skips
the gather and runs ``scaled_dot_product_attention`` on the cache in place, so the ``dense`` preset is
plain dense attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from twilight.cache import LayerCache
from twilight.estimate import gather_tokens
from twilight.prune import exp_weights
from twilight.selection import Selection

__all__ = ["sparse_decode_attention", "dense_decode_attention"]


def dense_decode_attention(q: torch.Tensor, cache: LayerCache, scale: float) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over every valid token of the cache, ``[B, Hq, D]``."""
    B, Hq, D = q.shape
    G = Hq // cache.num_kv_heads
    keys, values = cache.keys(), cache.values()  # [B, Hkv, L, D]
    qg = q.view(B, cache.num_kv_heads, G, D)
    mask = None
    if bool((cache.start > 0).any()):
        pos = torch.arange(cache.length, device=q.device)
        mask = (pos.view(1, 1, 1, -1) >= cache.start.view(-1, 1, 1, 1))  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D)


def sparse_decode_attention(q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over the tokens ``sel`` picks for each kv-head.

    Args:
        q: ``[B, Hq, D]``, the cache's dtype; Hq a multiple of the cache's Hkv.
        cache: the layer's ``LayerCache`` (exact K/V are read only at selected positions).
        sel: ``Selection`` with ``indices [B, Hkv, K_max]`` and ``counts [B, Hkv]``.
        scale: softmax scale, usually ``D ** -0.5``.
    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; a row with an empty selection yields zeros.

    Example::

        >>> cache = LayerCache(1, 2, 64); cache.append(torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64))
        >>> q = torch.randn(1, 4, 64)
        >>> out = sparse_decode_attention(q, cache, Selection.full(1, 2, 50), 64 ** -0.5)
        >>> torch.allclose(out, dense_decode_attention(q, cache, 64 ** -0.5), atol=1e-5)
        True
    """
    B, Hq, D = q.shape
    if B != cache.batch or D != cache.head_dim or Hq % cache.num_kv_heads:
        raise ValueError(f"q must be [B={cache.batch}, Hq (a multiple of Hkv={cache.num_kv_heads}), "
                         f"D={cache.head_dim}], got {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q dtype {q.dtype} does not match the cache dtype {cache.dtype}")
    if sel.indices.shape[:2] != (B, cache.num_kv_heads):
        raise ValueError(f"selection must be [B={B}, Hkv={cache.num_kv_heads}, K], got {tuple(sel.indices.shape)}")
    if sel.is_full_range:
        return dense_decode_attention(q, cache, scale)
    H, G = cache.num_kv_heads, Hq // cache.num_kv_heads
    keys = gather_tokens(cache.k, sel.indices)  # [B, Hkv, K, D]
    values = gather_tokens(cache.v, sel.indices)
    qg = q.view(B, H, G, D)
    logits = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, K]
    logits = logits.masked_fill_(~sel.valid().unsqueeze(2), float("-inf"))
    weights = exp_weights(logits)  # exp(logits - max), subnormals flushed to 0; an empty row is all 0
    probs = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.matmul(probs, values.float())  # [B, Hkv, G, D]
    return out.reshape(B, Hq, D).to(q.dtype)
