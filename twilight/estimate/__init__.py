"""Estimate: approximate ``q·k`` for the candidates of a `Selection`.

``estimate_scores(q, cache, sel, kind)`` returns ``[B, Hq, K_max]`` float32 raw dot products (not yet
multiplied by the softmax scale), ``-inf`` at padding slots. ``kind``:

- ``exact``: full-precision K.
- ``int8``: the cache's per-token int8 copy of K.
- ``int4``: the cache's per-token int4 copy of K (default). On the CPU, the packed keys go into PyTorch's
  int4 GEMV (``torch._weight_int4pack_mm_for_cpu``), reading only the 64-token tiles that hold candidates;
  elsewhere the gathered codes are unpacked with tensor ops (the GPU backends have kernels).

PyTorch's CPU GEMV packs tokens in blocks of 64 on AVX-512 machines and of 32 elsewhere (AVX2).
``cpu_int4_block()`` finds out which, once per process, by running the GEMV on a probe it can check; the torch
backend builds its CPU caches in that layout (``LayerCache.int4_block``), so keys are scored where they lie.
A cache in another layout (or should neither layout reproduce the probe) is scored by the portable path.
"""
from __future__ import annotations

import functools

import torch

from twilight._compat import INDEX_DTYPE
from twilight._tensors import check_selection, compact, gather_tokens, group_queries
from twilight.cache import LayerCache
from twilight.config import ESTIMATOR_TYPES
from twilight.quant import INT4_TILE
from twilight.selection import Selection

__all__ = ["estimate_scores", "ESTIMATOR_TYPES"]

_CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
# Above this fraction of 64-token tiles holding candidates, scoring every tile in place beats gathering.
_GATHER_MAX_FRACTION = 0.6


def _exact(qg: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    keys = gather_tokens(cache.k, sel.indices)  # [B, Hkv, K, D]
    return torch.matmul(qg.float(), keys.float().transpose(-1, -2))  # [B, Hkv, G, K]


def _affine_scores(qf: torch.Tensor, codes: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
    """``q·k`` for keys ``k = codes * scale + mid``: ``qf [B, H, G, D]``, ``codes [B, H, K, D]``, ``qp [B, H, K, 2]``.

    ``q·(c * scale + mid) = scale * (q·c) + mid * sum(q)``: one matmul on the codes, no dequantized copy.
    """
    dots = torch.matmul(qf, codes.transpose(-1, -2))  # [B, H, G, K]
    return dots * qp[..., 0].unsqueeze(2) + qf.sum(-1, keepdim=True) * qp[..., 1].unsqueeze(2)


def _int8(qg: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    codes = gather_tokens(cache.k_int8, sel.indices).float()  # [B, Hkv, K, D]
    qp = gather_tokens(cache.k_qparams, sel.indices)  # [B, Hkv, K, 2]
    return _affine_scores(qg.float(), codes, qp)


def _int4_unpacked(qg: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """Portable int4 path: gather each candidate's bytes from the tiled layout, unpack, dequantize."""
    B, H, K = sel.indices.shape
    D = cache.head_dim
    blk, half = cache.int4_block, cache.int4_block // 2
    idx = sel.indices.long()
    tile, c = idx // blk, idx % blk
    # byte [tile, d, c % half] of the (b, h) row, in the view [B*H, tiles, D, half]
    n_tiles = cache.capacity // blk
    bh = torch.arange(B * H, device=idx.device).view(B, H, 1)
    base = ((bh * n_tiles + tile) * D) * half + (c % half)  # [B, H, K]
    d_off = torch.arange(D, device=idx.device) * half
    packed = cache.k_int4.reshape(-1)[(base.unsqueeze(-1) + d_off).reshape(-1)].view(B, H, K, D)
    shift = ((c >= half).to(torch.uint8) * 4).unsqueeze(-1)
    codes = ((packed >> shift) & 0xF).float()
    qp = gather_tokens(cache.k_qparams, sel.indices)
    return _affine_scores(qg.float(), codes - 8.0, qp)


@functools.lru_cache(maxsize=None)
def cpu_int4_block() -> int | None:
    """Token block of PyTorch's CPU int4 GEMV layout here: 64 (AVX-512), 32 (AVX2), or ``None`` (neither works).

    Decided by running the GEMV on random packed keys in each layout and comparing with the dequantized
    matmul, so a PyTorch release that changes the layout falls back to the portable path instead of scoring
    garbage.
    """
    from twilight.quant import dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(0)
    D = 64
    keys = torch.randn(2 * INT4_TILE, D, generator=g)
    q = torch.randn(1, D, generator=g)
    for block in (64, 32):
        rows, qparams = quantize_int4(keys, block)
        ref = q @ dequantize_int4(rows, qparams, block).T  # [1, 128]
        try:
            out = torch._weight_int4pack_mm_for_cpu(q.to(torch.bfloat16), rows, D,
                                                   qparams.to(torch.bfloat16).unsqueeze(0)).float()
        except RuntimeError:
            return None
        if torch.allclose(out, ref, rtol=0.02, atol=0.05 * float(ref.abs().mean())):
            return block
    return None


def _int4_cpu(qg: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """CPU int4 path: PyTorch's int4 GEMV on the cache's own block layout, no unpacking, no repacking.

    Which keys it reads: every block in place for a full-range selection (or when most blocks hold
    candidates); one block per page (or the blocks of a page) for Quest's page-major selections; otherwise the
    blocks that hold candidates, gathered.
    """
    B, H, G, D = qg.shape
    blk = cache.int4_block
    idx = sel.indices.to(INDEX_DTYPE)
    K = idx.shape[-1]
    n_blocks = -(-cache.length // blk)
    cap_blocks = cache.capacity // blk
    flat = None
    ps = sel.page_size
    bh = torch.arange(B * H, device=idx.device, dtype=idx.dtype).view(B, H, 1) * cap_blocks
    if sel.is_full_range:
        column = None if cache.max_start == 0 else idx  # no padding: column j is position j
    elif ps is not None and ps % blk == 0:  # each page is ps / blk whole blocks: the gathered rows are the row's
        per = ps // blk                     # tokens in slot order
        pages = idx[..., ::ps] // ps  # [B, H, n_pages]
        blocks = (pages.unsqueeze(-1) * per + torch.arange(per, device=idx.device, dtype=idx.dtype)).flatten(-2)
        flat, column = (blocks + bh).view(-1), None
    else:
        # The blocks holding candidates (for Quest's pages: one per page, two pages may share one), each read once.
        if ps is not None and blk % ps == 0:
            owners = idx[..., ::ps] // blk  # [B, H, n_pages]: every slot of a page is valid but the last page's tail
        else:
            owners = torch.where(sel.valid(), idx // blk, n_blocks)
        touched = torch.zeros(B, H, n_blocks + 1, dtype=torch.bool, device=idx.device)
        touched.scatter_(-1, owners, True)
        touched = touched[..., :n_blocks]
        if float(touched.float().mean()) > _GATHER_MAX_FRACTION:  # most blocks hold candidates: read all in place
            column = idx
        else:
            blocks, _ = compact(torch.arange(n_blocks, device=idx.device).expand(B, H, n_blocks), touched)
            # Position of each touched block in the gathered list; padding slots read a real column (masked later).
            rank = (torch.cumsum(touched, -1, dtype=torch.int32) - 1).clamp_min(0)
            column = rank.gather(-1, idx // blk) * blk + idx % blk
            flat = (blocks.to(idx.dtype) + bh).view(-1)
    if flat is None:  # every block in place
        rows = cache.k_int4[:, :, :n_blocks * blk]  # [B, H, n * blk, D/2]
        qparams = cache.k_qparams[:, :, :n_blocks * blk].to(torch.bfloat16)
    else:
        rows = cache.k_int4.view(B * H * cap_blocks, -1).index_select(0, flat).view(B, H, -1, D // 2)
        qparams = cache.k_qparams.view(B * H * cap_blocks, -1).index_select(0, flat).to(torch.bfloat16)
        qparams = qparams.view(B, H, -1, 2)
    a = qg.to(torch.bfloat16)
    # (scale, mid) is torch's (scale, zero) for codes - 8
    out = torch.stack([torch._weight_int4pack_mm_for_cpu(a[b, h], rows[b, h], D, qparams[b, h].unsqueeze(0))
                       for b in range(B) for h in range(H)]).view(B, H, G, -1)
    if column is None:
        return out[..., :K].float()
    return out.gather(-1, column.unsqueeze(2).expand(B, H, G, -1)).float()


def estimate_scores(q: torch.Tensor, cache: LayerCache, sel: Selection, kind: str = "int4",
                    host_reads: bool = True) -> torch.Tensor:
    """Approximate ``q·k`` of each query head for its kv-head's candidates.

    Args:
        q: ``[B, Hq, D]`` queries; cache: the layer's ``LayerCache``; sel: candidates ``[B, Hkv, K_max]``.
        kind: ``exact | int8 | int4``.
        host_reads: on the CPU, int4 keys go through PyTorch's GEMV, which sizes its reads from the selection
            (reading counts back); ``False`` runs the fixed-shape portable path a GPU runs.
    Returns:
        ``[B, Hq, K_max]`` float32, ``-inf`` where ``slot >= counts``.

    Example::

        >>> cache = LayerCache(1, 2, 64); cache.append(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
        >>> sel = Selection.full(1, 2, 300)
        >>> q = torch.randn(1, 4, 64)
        >>> est, ref = estimate_scores(q, cache, sel, "int4"), estimate_scores(q, cache, sel, "exact")
        >>> bool((est - ref).abs().mean() < 0.2 * ref.abs().mean())  # int4 errors: ~10% of a typical score
        True
    """
    qg = group_queries(q, cache)
    check_selection(sel, cache)
    cache.update_derived()
    if kind == "exact":
        scores = _exact(qg, cache, sel)
    elif kind == "int8":
        if cache.quant_bits != 8:
            raise ValueError("estimator.type='int8' needs a cache built with quant_bits=8")
        scores = _int8(qg, cache, sel)
    elif kind == "int4":
        if cache.quant_bits != 4:
            raise ValueError("estimator.type='int4' needs a cache built with quant_bits=4")
        if host_reads and q.device.type == "cpu" and cache.head_dim in _CPU_INT4_GROUP_SIZES and \
                cache.int4_block == cpu_int4_block():
            scores = _int4_cpu(qg, cache, sel)
        else:
            scores = _int4_unpacked(qg, cache, sel)
    else:
        raise ValueError(f"estimator.type={kind!r} is invalid: must be one of {', '.join(ESTIMATOR_TYPES)}")
    B, H, G, K = scores.shape
    if sel.uniform_count is not None:  # padding slots, if any, are the tail of every row
        # no branch on the count (symbolic under torch.compile: a branch is a guard, two graphs)
        tail = torch.arange(K, device=scores.device) >= sel.uniform_count
        scores = scores.masked_fill(tail, float("-inf"))
    else:
        scores = scores.masked_fill(~sel.valid().unsqueeze(2), float("-inf"))
    return scores.reshape(B, H * G, K)
