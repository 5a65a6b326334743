"""Attend: decode attention over a `Selection` with the exact K/V.

``sparse_decode_attention(q, cache, sel, scale)`` gathers each kv-head's selected keys and values once and
lets every query head of its GQA group attend to them (with ``sel.head_mask``, ``selector.gqa="head"``: each query
head to its own slots only). A full-range selection (``Selection.full``) skips
the gather and runs ``scaled_dot_product_attention`` on the cache in place, so the ``dense`` preset is
plain dense attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from twilight._tensors import check_selection, exp_weights, gather_tokens, group_queries
from twilight.cache import LayerCache
from twilight.selection import Selection

__all__ = ["sparse_decode_attention", "dense_decode_attention"]


def dense_decode_attention(q: torch.Tensor, cache: LayerCache, scale: float) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over every valid token of the cache, ``[B, Hq, D]``."""
    qg = group_queries(q, cache)  # [B, Hkv, G, D]
    keys, values = cache.keys(), cache.values()  # [B, Hkv, L, D]
    mask = None
    if cache.max_start > 0:  # a host copy: no read back from the device
        pos = torch.arange(cache.length, device=q.device)
        mask = (pos.view(1, 1, 1, -1) >= cache.start.view(-1, 1, 1, 1))  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
    return out.reshape(q.shape)


def sparse_decode_attention(q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float,
                            host_reads: bool = True) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over the tokens ``sel`` picks for each kv-head.

    Args:
        q: ``[B, Hq, D]``, the cache's dtype; Hq a multiple of the cache's Hkv.
        cache: the layer's ``LayerCache`` (exact K/V are read only at selected positions).
        sel: ``Selection`` with ``indices [B, Hkv, K_max]`` and ``counts [B, Hkv]``; with ``head_mask``, each query
            head attends only to the slots it selected.
        scale: softmax scale, usually ``D ** -0.5``.
        host_reads: on the CPU, attend to exactly the selected tokens (their positions are read from
            ``sel``); ``False`` keeps shapes fixed by ``sel``'s width (no read back, as on a GPU).
    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; a query head with an empty selection yields zeros.

    Example::

        >>> cache = LayerCache(1, 2, 64); cache.append(torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64))
        >>> q = torch.randn(1, 4, 64)
        >>> out = sparse_decode_attention(q, cache, Selection.full(1, 2, 50), 64 ** -0.5)
        >>> torch.allclose(out, dense_decode_attention(q, cache, 64 ** -0.5), atol=1e-5)
        True
    """
    qg = group_queries(q, cache)  # [B, Hkv, G, D]
    if q.dtype != cache.dtype:
        raise ValueError(f"q dtype {q.dtype} does not match the cache dtype {cache.dtype}")
    check_selection(sel, cache)
    if sel.is_full_range:
        return dense_decode_attention(q, cache, scale)
    B, Hq, D = q.shape
    if q.device.type == "cpu" and host_reads:
        return _attend_rows(qg, cache, sel, scale).reshape(B, Hq, D).to(q.dtype)
    keys = gather_tokens(cache.k, sel.indices)  # [B, Hkv, K, D]
    values = gather_tokens(cache.v, sel.indices)
    logits = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, K]
    attended = sel.head_valid(qg.shape[2]) if sel.head_mask is not None else sel.valid().unsqueeze(2)
    logits = logits.masked_fill_(~attended, float("-inf"))
    return _softmax_values(logits, values).reshape(B, Hq, D).to(q.dtype)


def _softmax_values(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``softmax(logits) @ values`` in float32; rows of all ``-inf`` give zeros."""
    weights = exp_weights(logits)  # exp(logits - max), subnormals flushed to 0
    probs = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.matmul(probs, values.float())


def _attend_rows(qg: torch.Tensor, cache: LayerCache, sel: Selection, scale: float) -> torch.Tensor:
    """``[B, Hkv, G, D]`` attention, one (batch, kv-head) row at a time over exactly its ``counts`` tokens.

    Budgets differ by 1000x between heads, so padding every row to the longest costs more than the loop, and
    flattening the rows needs ``[tokens, G, D]`` temporaries: on the CPU (where reading the counts is free) each
    row reads its own tokens, two gathers and two small matmuls.
    """
    B, H, G, D = qg.shape
    counts = sel.counts.tolist()
    heads = sel.head_valid(G) if sel.head_mask is not None else None
    out = torch.zeros(B, H, G, D, dtype=torch.float32, device=qg.device)
    for b in range(B):
        for h in range(H):
            n = counts[b][h]
            if n == 0:
                continue
            idx = sel.indices[b, h, :n]
            keys = cache.k[b, h].index_select(0, idx)  # [n, D]
            values = cache.v[b, h].index_select(0, idx)
            logits = torch.matmul(qg[b, h].float(), keys.float().t()) * scale  # [G, n]
            if heads is not None:  # gqa="head": each query head over its own slots
                logits.masked_fill_(~heads[b, h, :, :n], float("-inf"))
            out[b, h] = _softmax_values(logits, values)
    return out
