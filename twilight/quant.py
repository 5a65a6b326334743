"""Per-token min-max quantization of keys, in the layouts the cache stores.

Both formats quantize each token's key vector (one row of ``D`` channels) with its own scale and
offset; ``qparams[..., 0]`` is the scale and ``qparams[..., 1]`` the *mid* value, so that

    int4:  k ≈ (q - 8)   * scale + mid,   q in [0, 15]
    int8:  k ≈ q         * scale + mid,   q in [-128, 127]

The absolute error per channel is at most ``scale / 2 = (max - min) / 30`` for int4 and
``(max - min) / 510`` for int8 (plus float rounding).

**int4 layout.** Tokens are grouped in tiles of ``block`` tokens (``INT4_TILE = 64`` by default); a tile is
stored dim-major: byte ``[tile, d, c]`` (``c < block / 2``) holds channel ``d`` of token ``c`` in its low nibble
and of token ``c + block / 2`` in its high nibble. Viewed as ``[T, D // 2]`` bytes this is exactly the layout
PyTorch's CPU int4 GEMV (``torch._weight_int4pack_mm_for_cpu``) consumes, with 64-token blocks on AVX-512
CPUs and 32-token blocks on AVX2 ones, so the torch backend scores keys without unpacking them; the Triton
and CUDA kernels address the 64-token layout.
"""
from __future__ import annotations

import torch

INT4_TILE = 64
INT4_BLOCKS = (32, 64)  # tile sizes the cache can keep


def _minmax_params(x: torch.Tensor, levels: int, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, mid)`` for ``levels`` quantization steps; ``x``: ``[..., D]``."""
    x = x.float()
    lo = x.amin(-1)
    hi = x.amax(-1)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    mid = lo + offset * scale
    return scale, mid


def quantize_int4(x: torch.Tensor, block: int = INT4_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., T, D]`` (``T`` a multiple of ``block``, ``D`` even) to the tiled int4 layout.

    Returns ``packed [..., T, D // 2] uint8`` and ``qparams [..., T, 2] float32`` (scale, mid).

    Example::

        >>> k = torch.randn(2, 64, 128)
        >>> packed, qp = quantize_int4(k)
        >>> (dequantize_int4(packed, qp) - k).abs().max() <= (qp[..., 0].max() / 2 + 1e-5)
        tensor(True)
    """
    qparams = int4_params(x)
    return pack_int4(int4_codes(x, qparams), block), qparams


def int4_params(x: torch.Tensor) -> torch.Tensor:
    """Per-row int4 ``qparams [..., 2]`` (scale, mid) of ``x [..., D]``."""
    scale, mid = _minmax_params(x, 15, 8.0)
    return torch.stack([scale, mid], -1)


def _check_block(block: int) -> int:
    if block not in INT4_BLOCKS:
        raise ValueError(f"int4 block={block!r} is invalid: must be one of {INT4_BLOCKS}")
    return block


def pack_int4(codes: torch.Tensor, block: int = INT4_TILE) -> torch.Tensor:
    """Pack codes ``[..., T, D]`` (uint8 in [0, 15]; ``T % block == 0``, even ``D``) into ``[..., T, D // 2]``."""
    *lead, T, D = codes.shape
    if T % _check_block(block) or D % 2:
        raise ValueError(f"int4 packing needs T % {block} == 0 and even D, got T={T}, D={D}")
    q = codes.reshape(*lead, T // block, block, D).transpose(-1, -2)  # [..., tiles, D, block]
    packed = q[..., :block // 2] | (q[..., block // 2:] << 4)  # [..., tiles, D, block / 2]
    return packed.reshape(*lead, T, D // 2)


def unpack_int4(packed: torch.Tensor, block: int = INT4_TILE) -> torch.Tensor:
    """Inverse of ``pack_int4``: ``[..., T, D // 2] uint8`` -> codes ``[..., T, D]`` uint8."""
    *lead, T, half_d = packed.shape
    D = half_d * 2
    tiles = packed.reshape(*lead, T // _check_block(block), D, block // 2)
    q = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [..., tiles, D, block]
    return q.transpose(-1, -2).reshape(*lead, T, D)


def dequantize_int4(packed: torch.Tensor, qparams: torch.Tensor, block: int = INT4_TILE) -> torch.Tensor:
    """``[..., T, D // 2]`` packed + ``[..., T, 2]`` params -> ``[..., T, D]`` float32."""
    q = unpack_int4(packed, block).float()
    return (q - 8.0) * qparams[..., 0:1] + qparams[..., 1:2]


def int4_codes(x: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] of ``x [..., D]`` under per-row ``qparams [..., 2]``."""
    return torch.round((x.float() - qparams[..., 1:2]) / qparams[..., 0:1] + 8.0).clamp_(0, 15).to(torch.uint8)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., D]`` per row to int8. Returns ``codes [..., D] int8`` and ``qparams [..., 2] float32``."""
    scale, mid = _minmax_params(x, 255, 128.0)
    q = torch.round((x.float() - mid.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)
    return q, torch.stack([scale, mid], -1)


def dequantize_int8(codes: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    return codes.float() * qparams[..., 0:1] + qparams[..., 1:2]


def round_outward(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast bounds to ``dtype`` so that they still bound the exact values: ``lo`` rounded down, ``hi`` up.

    Round-to-nearest moves a value by at most half a unit in the last place: ``|x| * eps / 2`` for normal
    numbers, half the smallest subnormal below them. Widening each bound by ``|x| * c`` with
    ``c = eps / 2 + eps**2`` (which covers the half unit of the widened value too; taken as the larger of
    ``x * (1 ± c)``, so that the infinite bounds of empty pages stay infinite) plus the smallest subnormal of
    ``dtype`` before the cast keeps it on the safe side, about one unit looser than the tightest bound, with
    elementwise ops only (no constants built on the host).
    """
    if lo.dtype == dtype:
        return lo, hi
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # the smallest subnormal of dtype
    lo, hi = lo.float(), hi.float()
    if info.max < 1e30:  # float16: a finite value past its range would round to the wrong infinity
        lo, hi = lo.clamp(max=info.max), hi.clamp(min=-info.max)
    c = info.eps / 2 + info.eps ** 2
    lo_c = (torch.minimum(lo * (1 + c), lo * (1 - c)) - tiny).to(dtype)
    hi_c = (torch.maximum(hi * (1 + c), hi * (1 - c)) + tiny).to(dtype)
    return lo_c, hi_c
