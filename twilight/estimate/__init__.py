"""Estimate: approximate ``q·k`` for the candidates of a `Selection`.

``estimate_scores(q, cache, sel, kind)`` returns ``[B, Hq, K_max]`` float32 raw dot products (not yet
multiplied by the softmax scale), ``-inf`` at padding slots. ``kind``:

- ``exact``: full-precision K.
- ``int8``: the cache's per-token int8 copy of K.
- ``int4``: the cache's per-token int4 copy of K (default). On the CPU, the packed keys go into PyTorch's
  int4 GEMV (``torch._weight_int4pack_mm_for_cpu``), reading only the 64-token tiles that hold candidates;
  elsewhere the gathered codes are unpacked with tensor ops (the GPU backends have kernels).

PyTorch's CPU GEMV packs tokens in blocks of 64 on AVX-512 machines and of 32 elsewhere (AVX2).
``cpu_int4_block()`` finds out which, once per process, by running the GEMV on a probe it can check; the
cache keeps the 64-token layout, so with 32-token blocks the tiles read are repacked first. Should neither
layout reproduce the probe, the portable path serves the CPU too.
"""
from __future__ import annotations

import functools

import torch

from twilight._checks import check_selection, group_queries
from twilight._compat import INDEX_DTYPE
from twilight.cache import LayerCache
from twilight.config import ESTIMATOR_TYPES
from twilight.quant import INT4_TILE
from twilight.select import compact
from twilight.selection import Selection

__all__ = ["estimate_scores", "gather_tokens", "ESTIMATOR_TYPES"]

_CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
# Above this fraction of 64-token tiles holding candidates, scoring every tile in place beats gathering.
_GATHER_MAX_FRACTION = 0.6


def gather_tokens(store: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of ``store [B, H, capacity, X]`` at ``indices [B, H, K]`` -> ``[B, H, K, X]``.

    One ``index_select`` over the flattened rows (much faster than ``torch.gather`` on CPU).
    """
    B, H, cap, X = store.shape
    dtype = torch.int32 if B * H * cap < 2**31 else torch.int64
    base = torch.arange(B * H, device=store.device, dtype=dtype).view(B, H, 1) * cap
    flat = (indices.to(dtype) + base).reshape(-1)
    return store.reshape(B * H * cap, X).index_select(0, flat).view(B, H, -1, X)


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
    idx = sel.indices.long()
    tile, c = idx // INT4_TILE, idx % INT4_TILE
    # byte [tile, d, c % 32] of the (b, h) row, in the view [B*H, tiles, D, 32]
    n_tiles = cache.capacity // INT4_TILE
    bh = torch.arange(B * H, device=idx.device).view(B, H, 1)
    base = ((bh * n_tiles + tile) * D) * (INT4_TILE // 2) + (c % (INT4_TILE // 2))  # [B, H, K]
    d_off = torch.arange(D, device=idx.device) * (INT4_TILE // 2)
    packed = cache.k_int4.reshape(-1)[(base.unsqueeze(-1) + d_off).reshape(-1)].view(B, H, K, D)
    shift = ((c >= INT4_TILE // 2).to(torch.uint8) * 4).unsqueeze(-1)
    codes = ((packed >> shift) & 0xF).float()
    qp = gather_tokens(cache.k_qparams, sel.indices)
    return _affine_scores(qg.float(), codes - 8.0, qp)


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable scratch buffer (large CPU temporaries otherwise page-fault fresh memory every step)."""
    numel = 1
    for n in shape:
        numel *= n
    key = (name, dtype, torch.device(device))
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[key] = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                                             dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _repack_block32(rows: torch.Tensor) -> torch.Tensor:
    """``[..., T, D/2]`` bytes in the cache's 64-token tiles -> PyTorch's 32-token block layout (AVX2).

    A 64-token tile ``[D, 32]`` holds token ``c`` in the low and ``c + 32`` in the high nibble; a 32-token block
    ``[D, 16]`` holds token ``c`` and ``c + 16``.
    """
    *lead, T, half_d = rows.shape
    D = 2 * half_d
    tiles = rows.reshape(*lead, T // INT4_TILE, D, INT4_TILE // 2)
    codes = torch.cat([tiles & 0xF, tiles >> 4], -1).view(*lead, T // INT4_TILE, D, 2, 32)  # [.., tiles, D, 2, 32]
    packed = codes[..., :16] | (codes[..., 16:] << 4)  # [..., tiles, D, 2, 16]
    return packed.transpose(-3, -2).reshape(*lead, T, half_d)


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
    packed, qparams = quantize_int4(keys)
    ref = q @ dequantize_int4(packed, qparams).T  # [1, 128]
    for block, rows in ((64, packed), (32, _repack_block32(packed))):
        try:
            out = torch._weight_int4pack_mm_for_cpu(q.to(torch.bfloat16), rows, D,
                                                   qparams.to(torch.bfloat16).unsqueeze(0)).float()
        except RuntimeError:
            return None
        if torch.allclose(out, ref, rtol=0.02, atol=0.05 * float(ref.abs().mean())):
            return block
    return None


def _int4_cpu(qg: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """CPU int4 path: PyTorch's int4 GEMV over the tiles holding candidates, no unpacking."""
    B, H, G, D = qg.shape
    idx = sel.indices.to(INDEX_DTYPE)
    n_tiles = -(-cache.length // INT4_TILE)
    cap_tiles = cache.capacity // INT4_TILE
    touched = None
    if not sel.is_full_range:
        tile_of = idx >> 6  # INT4_TILE == 64
        touched = torch.zeros(B, H, n_tiles + 1, dtype=torch.bool, device=idx.device)
        touched.scatter_(-1, torch.where(sel.valid(), tile_of, n_tiles), True)
        touched = touched[..., :n_tiles]
    if touched is None or bool(touched.float().mean() > _GATHER_MAX_FRACTION):
        # Most tiles hold candidates: run the GEMV over every tile in place rather than gathering.
        rows = cache.k_int4[:, :, :n_tiles * INT4_TILE]  # [B, H, n * 64, D/2]
        qparams = cache.k_qparams[:, :, :n_tiles * INT4_TILE]
        column = idx  # [B, H, K]: where each candidate's score lands in the GEMV output
    else:  # gather the touched tiles of every (b, h) into one padded batch
        tiles, _ = compact(torch.arange(n_tiles, device=idx.device).expand(B, H, n_tiles), touched)  # [B, H, T]
        # Position of each touched tile in the gathered list. Padding slots may point at tiles no candidate
        # touches (their value is any valid position): clamp so they read a real column (masked later).
        rank = (torch.cumsum(touched, -1, dtype=torch.int32) - 1).clamp_min(0)
        column = rank.gather(-1, tile_of) * INT4_TILE + (idx & (INT4_TILE - 1))
        flat = (tiles + torch.arange(B * H, device=idx.device, dtype=torch.int32).view(B, H, 1) * cap_tiles).view(-1)
        rows = _workspace("int4_rows", (flat.numel(), INT4_TILE * D // 2), torch.uint8, idx.device)
        torch.index_select(cache.k_int4.view(B * H * cap_tiles, -1), 0, flat, out=rows)
        rows = rows.view(B, H, -1, D // 2)
        qparams = cache.k_qparams.view(B * H * cap_tiles, -1).index_select(0, flat).view(B, H, -1, 2)
    if cpu_int4_block() == 32:
        rows = _repack_block32(rows)
    a = qg.to(torch.bfloat16)
    qparams = qparams.to(torch.bfloat16)  # (scale, mid) is torch's (scale, zero) for codes - 8
    out = torch.empty(B, H, G, rows.shape[2], dtype=torch.bfloat16, device=qg.device)
    for b in range(B):
        for h in range(H):
            out[b, h] = torch._weight_int4pack_mm_for_cpu(a[b, h], rows[b, h], D, qparams[b, h].unsqueeze(0))
    return out.gather(-1, column.unsqueeze(2).expand(B, H, G, -1)).float()


def estimate_scores(q: torch.Tensor, cache: LayerCache, sel: Selection, kind: str = "int4") -> torch.Tensor:
    """Approximate ``q·k`` of each query head for its kv-head's candidates.

    Args:
        q: ``[B, Hq, D]`` queries; cache: the layer's ``LayerCache``; sel: candidates ``[B, Hkv, K_max]``.
        kind: ``exact | int8 | int4``.
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
    if kind == "exact":
        scores = _exact(qg, cache, sel)
    elif kind == "int8":
        if cache.quant_bits != 8:
            raise ValueError("estimator.type='int8' needs a cache built with quant_bits=8")
        scores = _int8(qg, cache, sel)
    elif kind == "int4":
        if cache.quant_bits != 4:
            raise ValueError("estimator.type='int4' needs a cache built with quant_bits=4")
        if q.device.type == "cpu" and cache.head_dim in _CPU_INT4_GROUP_SIZES and cpu_int4_block() is not None:
            scores = _int4_cpu(qg, cache, sel)
        else:
            scores = _int4_unpacked(qg, cache, sel)
    else:
        raise ValueError(f"estimator.type={kind!r} is invalid: must be one of {', '.join(ESTIMATOR_TYPES)}")
    B, H, G, K = scores.shape
    scores = scores.masked_fill(~sel.valid().unsqueeze(2), float("-inf"))
    return scores.reshape(B, H * G, K)
