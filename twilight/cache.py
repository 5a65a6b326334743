"""`LayerCache`: one layer's exact K/V plus what the selectors and estimators read.

The cache holds the exact K/V, the storage (capacity, growth), the positions (length, left padding, the page grid)
and the derived structures as parts (``twilight.derived``: ``Int4Keys`` or ``Int8Keys``, ``PageBounds``,
``KeyLabels``), each owning its buffers. Kept in sync on every append (prefill in bulk, decode one token at a time),
and read through the cache under these names:

- ``k``, ``v``: exact keys and values, ``[B, Hkv, capacity, D]``.
- ``k_int4`` ``[B, Hkv, capacity, D // 2]`` uint8 (tiled layout, see ``twilight.quant``) or ``k_int8``
  ``[B, Hkv, capacity, D]`` int8, with ``k_qparams [B, Hkv, capacity, 2]`` float32 (scale, mid).
- ``page_bounds`` ``[B, Hkv, pages, 2, D]``: per-page channel max (``[..., 0, :]``) and min
  (``[..., 1, :]``) of the valid keys, for Quest. Stored exactly, in the cache's dtype, by default; a
  ``bounds_dtype`` of lower precision (bf16 for a float32 cache: half the bytes Quest reads) rounds them
  outward, so they still bound the exact keys. Which one is a property of the cache, never of the CPU or the
  backend: every backend reads the same bounds and scores pages with the same float32 products.
- ``k_label`` ``[B, Hkv, capacity, C]``: the label channels of K, for Double Sparsity; with ``label_bits``
  each token's label vector is min-max quantized to that many bits and stored dequantized
  (``quantize_labels``), as the original Twilight code scores Double Sparsity against.

Storage. When the final length is known (``initial_capacity``: ``generate()`` says it, ``make_cache(model,
max_cache_len=...)`` too) every buffer is allocated once at that capacity, rounded up to whole int4 tiles and
pages, plus one such granule spare (so that a view of the held positions is never a whole buffer: a compiled
decode step keeps one shape to its last token), and never again: memory is the plain K/V plus its compressed
copy, nothing more. A cache that outgrows its capacity (a manual loop that never said its length) grows by a
quarter at a time (rounded to whole tiles and pages), so appends cost amortised O(new tokens) and at most ~25%
of the storage is spare; the cache never concatenates the whole K/V per step. With ``lazy_derived`` the derived
structures are brought up to date by ``update_derived()`` (the pipeline calls it when a sparse step needs
them) instead of on every append: a context that stays below the dense crossover never pays for them, and a
one-token update writes one token's nibbles and widens one page's bounds (a few elementwise ops, no repacking).

Batches: every sequence appends the same number of positions (as Hugging Face models do); sequence
``b`` is valid on ``[start[b], length)``, where ``start`` counts its left padding. Padding positions are
excluded from page bounds and never selected. Pages are cut from each sequence's first valid token, so a
left-padded sequence has the pages it has alone: page ``g`` of sequence ``b`` holds positions
``[g * page_size + page_offset[b], (g + 1) * page_size + page_offset[b])`` with
``page_offset = start % page_size`` (0 without padding: page ``g`` is ``[g * page_size, (g + 1) * page_size)``).
"""
from __future__ import annotations

import math

import torch

from twilight.derived import (
    DerivedPart,
    Int4Keys,
    Int8Keys,
    KeyLabels,
    PageBounds,
    _check_label_bits,
    grown,
    quantize_labels,
)
from twilight.quant import INT4_BLOCKS, INT4_TILE

__all__ = ["LayerCache", "quantize_labels"]

_MIN_CHUNK = 256  # the smallest storage grown to when no capacity was given (tokens)
_GROWTH = 1.25  # a cache that outgrows its capacity grows by this factor: at most a quarter of it is spare
_UPDATE_CHUNK = 2048  # tokens per step when updating derived structures


def _canonical_device(device) -> torch.device:
    """``device`` with its index: ``"cuda"`` becomes ``cuda:<current device>``, the device tensors report, so that
    comparing a tensor's device with the cache's is exact (``torch.device("cuda") != torch.device("cuda:0")``)."""
    dev = torch.device(device)
    if dev.index is None and dev.type not in ("cpu", "meta"):
        dev = torch.empty(0, device=dev).device
    return dev


class LayerCache:
    """Exact and compressed keys/values of one attention layer.

    Args:
        batch, num_kv_heads, head_dim: cache geometry.
        dtype, device: of the exact K/V.
        page_size: Quest page size in tokens (``page_bounds`` kept when ``keep_page_bounds``).
        quant_bits: 4, 8 or ``None``: which quantized copy of K to keep.
        label_channels: ``[Hkv, C]`` channel indices kept in ``k_label`` (Double Sparsity), or ``None``.
        label_bits: ``None`` (exact labels) or 1..16: per-token min-max quantization of ``k_label``
            (``quantize_labels``); ignored without ``label_channels``.
        start: ``[B]`` first valid position of each sequence (left padding), default all zero.
        initial_capacity: positions to allocate now, rounded up to whole int4 tiles and pages: the final length
            when it is known (then nothing is allocated again); 0 (default) starts small and grows.
        int4_block: tokens per tile of the int4 layout (64, or 32 for PyTorch's AVX2 CPU GEMV; ``twilight.quant``).
        bounds_dtype: dtype of ``page_bounds`` (default: the cache's dtype, float32 for float64: exact bounds;
            a lower precision is rounded outward).
        lazy_derived: update the derived structures in ``update_derived()`` rather than in ``append``.

    Example::

        >>> cache = LayerCache(1, 2, 64, dtype=torch.float32, device="cpu")
        >>> cache.append(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64))
        >>> cache.length, cache.keys().shape
        (100, torch.Size([1, 2, 100, 64]))
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", page_size: int = 16, quant_bits: int | None = 4,
                 keep_page_bounds: bool = True, label_channels: torch.Tensor | None = None,
                 label_bits: int | None = None, start: torch.Tensor | None = None, initial_capacity: int = 0,
                 int4_block: int = INT4_TILE, lazy_derived: bool = False, bounds_dtype: torch.dtype | None = None):
        if batch < 1 or num_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"batch, num_kv_heads, head_dim must be >= 1, got {batch}, {num_kv_heads}, {head_dim}")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} is invalid: must be an integer >= 1")
        if quant_bits not in (None, 4, 8):
            raise ValueError(f"quant_bits={quant_bits!r} is invalid: must be 4, 8 or None")
        if quant_bits == 4 and head_dim % 2:
            raise ValueError(f"int4 keys need an even head_dim, got {head_dim}")
        if int4_block not in INT4_BLOCKS:
            raise ValueError(f"int4_block={int4_block!r} is invalid: must be one of {INT4_BLOCKS}")
        self.int4_block = int4_block
        self.lazy_derived = lazy_derived
        # positions [0, length - _underived) have up-to-date derived structures. Kept as the count behind (1 in every
        # decode step) rather than as a second position: a compiled step then branches on a constant, not on a
        # comparison of two positions (which specialises the dynamic length: one recompile per step).
        self._underived = 0
        #: Updates one decode token's derived structures (``LayerCache._update_one`` by default); a backend with a
        #: fused kernel for it sets its own (``twilight.kernels.triton.append.update_token``).
        self.token_updater = None
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, _canonical_device(device)
        self.page_size = page_size
        if bounds_dtype is None:  # exact: a page's max and min are keys, representable in the keys' dtype
            bounds_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
        if bounds_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"bounds_dtype={bounds_dtype} is invalid: must be float16, bfloat16 or float32")
        self.bounds_dtype = bounds_dtype
        channels = None if label_channels is None else label_channels.to(self.device, torch.long)
        if channels is not None and (channels.dim() != 2 or channels.shape[0] != num_kv_heads):
            shape = tuple(channels.shape)
            hint = ""
            if len(shape) == 2 and shape[0] > num_kv_heads and shape[0] % num_kv_heads == 0:
                hint = ("; these look like one row per query head (a DoubleSparse q_proj/qk_proj entry under GQA): "
                        "read its k_proj rows (selector.channels_key='k') or calibrate per kv-head with "
                        "twilight.integrations.capture.calibrate_double_sparse")
            raise ValueError(f"label_channels must be [Hkv={num_kv_heads}, C] (one row per kv-head), "
                             f"got {shape}{hint}")
        if channels is not None and channels.numel() and (
                int(channels.min()) < 0 or int(channels.max()) >= head_dim):
            raise ValueError(f"label_channels must be channel indices in [0, head_dim={head_dim}), got values in "
                             f"[{int(channels.min())}, {int(channels.max())}]")
        _check_label_bits(label_bits)
        # The derived structures, one part each (twilight.derived), kept in sync with the keys.
        self.quantized: Int4Keys | Int8Keys | None = {4: Int4Keys(int4_block), 8: Int8Keys(), None: None}[quant_bits]
        self.bounds: PageBounds | None = PageBounds(page_size, bounds_dtype) if keep_page_bounds else None
        self.labels: KeyLabels | None = None if channels is None else KeyLabels(channels, label_bits)
        self.parts: tuple[DerivedPart, ...] = tuple(p for p in (self.quantized, self.bounds, self.labels) if p)
        #: What a selector observed in multi-token (prefill) forwards, by name: snapkv's last queries, h2o's
        #: accumulated attention. Tensors are ``[B, ...]``; ``twilight.integrations.hf.fork_cache`` copies them into
        #: another config's cache.
        self.observations: dict[str, object] = {}
        #: A selector's own running state (h2o's scores, snapkv's kept tokens), by name; cleared by new observations.
        self.selector_state: dict[object, object] = {}
        self.length = 0
        self.start = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.min_start = self.max_start = 0  # host copies of start's extremes (no device sync in decode steps)
        #: ``[B]`` int32 ``start % page_size``: where each sequence's page grid begins (see the module docstring).
        self.page_offset = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.pages_aligned = True  # host copy: every page_offset is 0 (pages at multiples of page_size)
        if start is not None:
            self.set_start(start)
        # The capacity is a multiple of every part's granule (the int4 tile: 64, a multiple of 32 too; the page
        # size); a cache of exact K/V only (dense layers) is allocated to the position.
        self._granule = math.lcm(1, *(p.granule for p in self.parts))
        self.capacity = 0
        self._alloc(initial_capacity if initial_capacity > 0 else _MIN_CHUNK)

    # ------------------------------------------------------------------ storage
    def _round_up(self, n: int) -> int:
        return -(-n // self._granule) * self._granule

    def _alloc(self, needed: int) -> None:
        """Storage for ``needed`` positions: exactly that (rounded up to the granule) the first time, else at least a
        quarter more than now, so that a cache growing token by token reallocates O(log) times; plus one spare
        granule, so that ``length < capacity`` always holds: a view of the held positions (``keys()``, the pages or
        int4 tiles they touch) never spans a whole buffer, and a compiled decode step never meets the contiguous
        special case (one more graph) on its last tokens."""
        quarter_more = math.ceil(_GROWTH * self.capacity) if self.capacity else 0
        new_cap = self._round_up(max(needed, quarter_more, 1)) + self._granule
        B, H, D = self.batch, self.num_kv_heads, self.head_dim
        first = self.capacity == 0
        self.k = grown(None if first else self.k, (B, H, new_cap, D), self.dtype, self.device)
        self.v = grown(None if first else self.v, (B, H, new_cap, D), self.dtype, self.device)
        for part in self.parts:
            part.allocate(self, new_cap)
        self.capacity = new_cap

    def set_start(self, start: torch.Tensor) -> None:
        """Set each sequence's first valid position (its count of left-padding tokens)."""
        start = torch.as_tensor(start, device=self.device).to(torch.int32).reshape(-1)
        if start.shape[0] != self.batch:
            raise ValueError(f"start must have one entry per sequence ({self.batch}), got {start.shape[0]}")
        if bool((start < 0).any()):
            raise ValueError("start must be >= 0")
        self.start = start
        self._start_changed()
        if self.derived_length and self.bounds is not None:
            self.bounds.update(self, 0, self.derived_length)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep the sequences ``index [B']`` (in that order, repeats allowed): beam-search reordering and
        Hugging Face's batch repeat/select. Every per-sequence buffer is re-indexed along the batch."""
        index = torch.as_tensor(index, device=self.device).to(torch.long).reshape(-1)
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        for part in self.parts:
            part.select_batch(index)
        def rows(value):  # a [B, ...] tensor, or a tuple of them (snapkv's kept tokens and their validity)
            if isinstance(value, tuple):
                return tuple(rows(v) for v in value)
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == self.batch:
                return value.index_select(0, index.to(value.device))
            return value

        for state in (self.observations, self.selector_state):
            for key, value in state.items():
                state[key] = rows(value)
        self.start = self.start.index_select(0, index)
        self.batch = index.numel()
        self._start_changed()

    def _start_changed(self) -> None:
        """Refresh what derives from ``start``: its host extremes and each sequence's page grid."""
        self.min_start, self.max_start = int(self.start.min()), int(self.start.max())
        self.page_offset = self.start % self.page_size
        self.pages_aligned = self.max_start == 0 or not bool(self.page_offset.any())

    # ------------------------------------------------------------------ appends
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v [B, Hkv, T, D]`` at positions ``[length, length + T)`` of every sequence."""
        expected = (self.batch, self.num_kv_heads)
        if k.dim() != 4 or k.shape[:2] != expected or k.shape[-1] != self.head_dim:
            raise ValueError(f"k must be [B={self.batch}, Hkv={self.num_kv_heads}, T, D={self.head_dim}], "
                             f"got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"k/v dtype {k.dtype}/{v.dtype} does not match the cache dtype {self.dtype}")
        T = k.shape[2]
        if T == 0:
            return
        L0, L1 = self.length, self.length + T
        if L1 >= self.capacity:  # keep a spare position (``_alloc``)
            self._alloc(L1)
        self.k[:, :, L0:L1].copy_(k)
        self.v[:, :, L0:L1].copy_(v)
        self.length = L1
        self._underived += T
        if not self.lazy_derived:
            self.update_derived()

    @property
    def derived_length(self) -> int:
        return self.length - self._underived

    @property
    def has_derived(self) -> bool:
        return bool(self.parts)

    # What the parts hold, under the names selectors and kernels read (an absent part: AttributeError, so that
    # ``hasattr(cache, "page_bounds")`` says whether the cache keeps page bounds).
    @property
    def quant_bits(self) -> int | None:
        """4, 8 or ``None``: the quantized copy of K kept."""
        return None if self.quantized is None else self.quantized.bits

    @property
    def keep_page_bounds(self) -> bool:
        return self.bounds is not None

    @property
    def label_channels(self) -> torch.Tensor | None:
        return None if self.labels is None else self.labels.channels

    @property
    def label_bits(self) -> int | None:
        return None if self.labels is None else self.labels.bits

    @staticmethod
    def _absent(name: str):
        raise AttributeError(f"this LayerCache keeps no {name}")

    @property
    def k_int4(self) -> torch.Tensor:
        return self.quantized.codes if isinstance(self.quantized, Int4Keys) else self._absent("k_int4")

    @property
    def k_int8(self) -> torch.Tensor:
        return self.quantized.codes if isinstance(self.quantized, Int8Keys) else self._absent("k_int8")

    @property
    def k_qparams(self) -> torch.Tensor:
        return self._absent("k_qparams") if self.quantized is None else self.quantized.qparams

    @property
    def page_bounds(self) -> torch.Tensor:
        return self._absent("page_bounds") if self.bounds is None else self.bounds.bounds

    @property
    def k_label(self) -> torch.Tensor:
        return self._absent("k_label") if self.labels is None else self.labels.labels

    def update_derived(self) -> None:
        """Bring the derived structures up to date with positions ``[derived_length, length)``."""
        n = self._underived
        if n == 0:
            return
        L1 = self.length
        L0 = L1 - n
        self._underived = 0
        if not self.has_derived:
            return
        if n == 1 and L0 >= self.max_start:  # a decode step's token: update in place
            (self.token_updater or LayerCache._update_one)(self, L0)
            return
        # Bulk updates go a granule-aligned chunk at a time: small temporaries stay in cache and are reused by
        # the allocator instead of page-faulting fresh memory for every bulk append.
        c0 = L0
        while c0 < L1:  # chunks end on multiples of _UPDATE_CHUNK; the next one starts where this one ended
            c1 = min(L1, c0 - c0 % _UPDATE_CHUNK + _UPDATE_CHUNK)
            self._update_derived(c0, c1)
            c0 = c1

    def _update_one(self, pos: int) -> None:
        """Derived structures of the single (valid) position ``pos``."""
        # A slice, not an integer index: indexing with a symbolic position specialises it under torch.compile.
        x = self.k.narrow(2, pos, 1).squeeze(2)  # [B, H, D]
        for part in self.parts:
            part.update_one(self, pos, x)

    def _update_derived(self, L0: int, L1: int) -> None:
        for part in self.parts:
            part.update(self, L0, L1)

    # ------------------------------------------------------------------ views
    def keys(self) -> torch.Tensor:
        """``[B, Hkv, length, D]`` view of the exact keys."""
        return self.k[:, :, :self.length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, :self.length]

    @property
    def num_pages(self) -> int:
        return -(-self.length // self.page_size)

    def lengths(self) -> torch.Tensor:
        """``[B]`` int32 count of valid tokens per sequence."""
        return (self.length - self.start).clamp_min(0)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per component at the current capacity, and the overhead over plain K/V."""
        parts = {"kv": self.k.nbytes + self.v.nbytes}
        for part in self.parts:
            parts.update({name: buffer.nbytes for name, buffer in part.buffers().items()})
        extra = sum(b for n, b in parts.items() if n != "kv")
        parts["extra"] = extra
        parts["overhead_ratio"] = extra / parts["kv"]
        return parts

