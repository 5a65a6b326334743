"""What a ``LayerCache`` derives from its exact keys: one small class per structure.

- ``Int4Keys``: 4-bit codes of K in the tiled layout of ``twilight.quant`` (``codes [B, Hkv, capacity, D // 2]``
  uint8) with each token's scale and mid (``qparams [B, Hkv, capacity, 2]`` float32), for the int4 estimator.
- ``Int8Keys``: 8-bit codes (``codes [B, Hkv, capacity, D]`` int8) and ``qparams``, for the int8 estimator.
- ``PageBounds``: per-page channel max and min of the valid keys (``bounds [B, Hkv, pages, 2, D]``), for Quest.
- ``KeyLabels``: the label channels of K (``labels [B, Hkv, capacity, C]``), for Double Sparsity.

Each part owns its buffers: it allocates them at the cache's capacity (keeping what they held when the cache
grows), re-indexes them along the batch, and keeps them in sync with the keys, in bulk (``update``: positions
``[L0, L1)``) or for one decode token (``update_one``: elementwise ops on that token only, which ``torch.compile``
traces with a symbolic position). The cache calls them; selectors and kernels read the buffers through the cache
(``LayerCache.k_int4``, ``page_bounds``, ...).
"""
from __future__ import annotations

import abc

import torch

from twilight.config import MAX_LABEL_BITS
from twilight.quant import INT4_TILE, int4_codes, int4_params, pack_int4, quantize_int8, round_outward, unpack_int4


def _check_label_bits(bits: int | None) -> int | None:
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_LABEL_BITS):
        raise ValueError(f"label_bits={bits!r} is invalid: must be None or an integer in [1, {MAX_LABEL_BITS}]")
    return bits


def quantize_labels(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Per-token min-max quantize-dequantize of label vectors ``x [..., C]`` to ``bits`` bits (``None``: ``x``).

    Each vector's range ``[min, max]`` is cut into ``2**bits - 1`` equal steps and every entry rounded to the
    nearest step: ``min + round((x - min) / step) * step`` (computed in float32, returned in ``x.dtype``).
    This is the original Twilight code's ``min_max_per_token_quant_kv``.

    Example::

        >>> quantize_labels(torch.tensor([[0.0, 0.4, 0.9, 3.0]]), 2)   # steps of 1.0 from 0 to 3
        tensor([[0., 0., 1., 3.]])
    """
    if _check_label_bits(bits) is None:
        return x
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)
    levels = 2 ** bits - 1
    step = (xf.amax(-1, keepdim=True) - lo).clamp_min(1e-9) / levels
    return (torch.round((xf - lo) / step).clamp_(0, levels) * step + lo).to(x.dtype)


def grown(old: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device,
           fill: float = 0) -> torch.Tensor:
    """A buffer of ``shape`` (positions on axis 2) holding ``old`` at its start."""
    new = torch.full(shape, fill, dtype=dtype, device=device)
    if old is not None:
        new.narrow(2, 0, old.shape[2]).copy_(old)
    return new


class DerivedPart(abc.ABC):
    """One structure derived from the exact keys (see the module docstring): the interface every part implements."""

    #: The cache's capacity is a multiple of this (whole int4 tiles, whole pages).
    granule: int = 1
    #: ``{name the cache exposes it under: attribute of the part holding it}``, for each of the part's tensors.
    fields: dict[str, str] = {}

    def buffers(self) -> dict[str, torch.Tensor]:
        """The part's tensors, by the name the cache exposes them under."""
        return {name: getattr(self, attr) for name, attr in self.fields.items()}

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep the sequences ``index`` (``LayerCache.select_batch``)."""
        for attr in self.fields.values():
            setattr(self, attr, getattr(self, attr).index_select(0, index))

    @abc.abstractmethod
    def allocate(self, cache, capacity: int) -> None:
        """(Re)allocate for ``capacity`` positions, keeping what is held."""

    @abc.abstractmethod
    def update(self, cache, L0: int, L1: int) -> None:
        """Bring positions ``[L0, L1)`` up to date (a bulk append)."""

    @abc.abstractmethod
    def update_one(self, cache, pos: int, x: torch.Tensor) -> None:
        """Bring the single valid position ``pos`` up to date; ``x [B, Hkv, D]`` is its key."""


class _QuantizedKeys(DerivedPart):
    codes: torch.Tensor | None = None
    qparams: torch.Tensor | None = None


class Int4Keys(_QuantizedKeys):
    """4-bit keys in the tiled layout of ``twilight.quant`` (``block`` tokens per tile) with scale and mid."""

    bits = 4
    granule = INT4_TILE  # 64: a multiple of every tile size
    fields = {"k_int4": "codes", "k_qparams": "qparams"}

    def __init__(self, block: int):
        self.block = block

    def allocate(self, cache, capacity: int) -> None:
        B, H, D, dev = cache.batch, cache.num_kv_heads, cache.head_dim, cache.device
        self.codes = grown(self.codes, (B, H, capacity, D // 2), torch.uint8, dev)
        self.qparams = grown(self.qparams, (B, H, capacity, 2), torch.float32, dev)

    def update(self, cache, L0: int, L1: int) -> None:
        """Requantize positions ``[L0, L1)``: repack the tiles they touch."""
        blk = self.block
        t0, t1 = (L0 // blk) * blk, -(-L1 // blk) * blk
        keys = cache.k[:, :, L0:L1]
        qp = int4_params(keys)
        self.qparams[:, :, L0:L1].copy_(qp)
        codes = unpack_int4(self.codes[:, :, t0:t1], blk)  # [B, H, t1 - t0, D]
        codes[:, :, L0 - t0:L1 - t0] = int4_codes(keys, qp)
        self.codes[:, :, t0:t1].copy_(pack_int4(codes, blk))

    def update_one(self, cache, pos: int, x: torch.Tensor) -> None:
        qp = int4_params(x)
        self.qparams.narrow(2, pos, 1).copy_(qp.unsqueeze(2))
        codes = int4_codes(x, qp)  # [B, H, D]
        blk, D = self.block, cache.head_dim
        half = blk // 2
        # The tile of pos, [blk, D / 2] bytes, is read as [D, blk / 2]: channel d of pos is byte d * half + pos % half
        # of it. Gathered by a tensor index, not a view at a symbolic offset (which a compiled step would specialise
        # on whether it is 0: one more graph every half tile).
        flat = self.codes.view(cache.batch, cache.num_kv_heads, -1)  # [B, H, capacity * D / 2]
        index = torch.arange(D, device=cache.device) * half + ((pos - pos % blk) * (D // 2) + pos % half)
        byte = flat.index_select(2, index)  # [B, H, D]: this token's bytes
        # It owns the low nibble (the high one belongs to a later position, not written yet: cleared) or the high
        # one (the low one kept). Branch-free: the position is symbolic under torch.compile.
        high = (pos % blk) // half  # 0 or 1
        flat.index_copy_(2, index, (byte & (0x0F * high)) | (codes << (4 * high)))


class Int8Keys(_QuantizedKeys):
    """8-bit keys with each token's scale and mid."""

    bits = 8
    fields = {"k_int8": "codes", "k_qparams": "qparams"}

    def allocate(self, cache, capacity: int) -> None:
        B, H, D, dev = cache.batch, cache.num_kv_heads, cache.head_dim, cache.device
        self.codes = grown(self.codes, (B, H, capacity, D), torch.int8, dev)
        self.qparams = grown(self.qparams, (B, H, capacity, 2), torch.float32, dev)

    def update(self, cache, L0: int, L1: int) -> None:
        codes, qp = quantize_int8(cache.k[:, :, L0:L1])
        self.codes[:, :, L0:L1].copy_(codes)
        self.qparams[:, :, L0:L1].copy_(qp)

    def update_one(self, cache, pos: int, x: torch.Tensor) -> None:
        codes, qp = quantize_int8(x)
        self.codes.narrow(2, pos, 1).copy_(codes.unsqueeze(2))
        self.qparams.narrow(2, pos, 1).copy_(qp.unsqueeze(2))


class PageBounds(DerivedPart):
    """Quest's per-page channel max (``[..., 0, :]``) and min (``[..., 1, :]``) of the valid keys, in ``dtype``
    (rounded outward where it is coarser than the keys'). Pages follow the cache's page grid (``page_offset``)."""

    bounds: torch.Tensor | None = None
    fields = {"page_bounds": "bounds"}

    def __init__(self, page_size: int, dtype: torch.dtype):
        self.granule, self.dtype = page_size, dtype

    def allocate(self, cache, capacity: int) -> None:
        B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
        # Pages not written yet bound nothing: max -inf, min +inf, so a token's bounds widen them in place.
        bounds = torch.empty((B, H, capacity // self.granule, 2, D), dtype=self.dtype, device=cache.device)
        bounds[:, :, :, 0].fill_(float("-inf"))
        bounds[:, :, :, 1].fill_(float("inf"))
        if self.bounds is not None:
            bounds[:, :, :self.bounds.shape[2]].copy_(self.bounds)
        self.bounds = bounds

    def update(self, cache, L0: int, L1: int) -> None:
        """Recompute the bounds of the pages that positions ``[L0, L1)`` touch, in every sequence."""
        ps = self.granule
        B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
        if cache.pages_aligned:
            p0, p1 = L0 // ps, -(-L1 // ps)
            keys = cache.k[:, :, p0 * ps:p1 * ps].float()  # [B, H, (p1 - p0) * ps, D]
            pos = torch.arange(p0 * ps, p1 * ps, device=cache.device).view(1, -1)  # [1, n]
        else:  # page g of sequence b starts at g * ps + page_offset[b]: gather each sequence's own pages
            p0, p1 = max(L0 - ps + 1, 0) // ps, -(-L1 // ps)  # every page any sequence's [L0, L1) touches
            pos = torch.arange(p0 * ps, p1 * ps, device=cache.device).view(1, -1) + cache.page_offset.view(-1, 1)
            index = pos.clamp_max(cache.capacity - 1).view(B, 1, -1, 1).expand(B, H, -1, D)
            keys = torch.gather(cache.k, 2, index).float()  # [B, H, (p1 - p0) * ps, D]
        valid = (pos >= cache.start.view(-1, 1)) & (pos < cache.length)  # [B, n]
        valid = valid.view(B, 1, -1, 1)
        hi = keys.masked_fill(~valid, float("-inf")).view(B, H, p1 - p0, ps, -1).amax(3)
        lo = keys.masked_fill(~valid, float("inf")).view(B, H, p1 - p0, ps, -1).amin(3)
        # Extremes of keys are keys: back in the keys' dtype exactly, then rounded outward only where the bounds'
        # dtype is coarser (as a decode token's update does), so bulk and token updates give the same bounds.
        lo, hi = round_outward(lo.to(cache.dtype), hi.to(cache.dtype), self.dtype)
        self.bounds[:, :, p0:p1, 0].copy_(hi)
        self.bounds[:, :, p0:p1, 1].copy_(lo)

    def update_one(self, cache, pos: int, x: torch.Tensor) -> None:
        lo, hi = round_outward(x, x, self.dtype)
        if cache.pages_aligned:
            page = self.bounds.narrow(2, pos // self.granule, 1).squeeze(2)  # [B, H, 2, D], a view: widened in place
            page[:, :, 0].copy_(torch.maximum(page[:, :, 0], hi))  # (out= a strided view is a graph break)
            page[:, :, 1].copy_(torch.minimum(page[:, :, 1], lo))
        else:  # each sequence's own page of pos (pos >= max_start >= page_offset)
            rows = torch.arange(cache.batch, device=cache.device)
            idx = (pos - cache.page_offset).div(self.granule, rounding_mode="floor").long()
            page = self.bounds[rows, :, idx]  # [B, H, 2, D], a copy
            page = torch.stack([torch.maximum(page[:, :, 0], hi), torch.minimum(page[:, :, 1], lo)], 2)
            self.bounds[rows, :, idx] = page


class KeyLabels(DerivedPart):
    """Double Sparsity's label channels of K (``channels [Hkv, C]``), min-max quantized per token to ``bits`` when
    set (stored dequantized: ``quantize_labels``)."""

    labels: torch.Tensor | None = None
    fields = {"k_label": "labels"}

    def __init__(self, channels: torch.Tensor, bits: int | None):
        self.channels, self.bits = channels, bits

    def allocate(self, cache, capacity: int) -> None:
        shape = (cache.batch, cache.num_kv_heads, capacity, self.channels.shape[1])
        self.labels = grown(self.labels, shape, cache.dtype, cache.device)

    def update(self, cache, L0: int, L1: int) -> None:
        idx = self.channels.view(1, cache.num_kv_heads, 1, -1).expand(cache.batch, -1, L1 - L0, -1)
        labels = torch.gather(cache.k[:, :, L0:L1], 3, idx)
        self.labels[:, :, L0:L1].copy_(quantize_labels(labels, self.bits))

    def update_one(self, cache, pos: int, x: torch.Tensor) -> None:
        self.update(cache, pos, pos + 1)
