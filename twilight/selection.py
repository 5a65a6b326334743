"""`Selection`: the set of tokens each kv-head attends to, passed between pipeline stages."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Padded per-(batch, kv-head) token index lists.

    indices: ``[B, Hkv, K_max]`` int32 positions into the cache; entries at ``>= counts`` are padding
        (their value is unspecified but always inside the cache's storage, so kernels may read them).
    counts: ``[B, Hkv]`` int32 number of valid entries per row.

    Valid entries of a row are distinct; they need not be sorted.

    head_mask: ``None`` (``selector.gqa="group"``): every query head of a kv-head's group attends to every valid
        entry of its row. ``[B, Hkv, G, K_max]`` bool (``selector.gqa="head"``): the row is the union of its ``G``
        query heads' own selections, and ``head_mask[b, h, g, s]`` says whether query head ``h * G + g`` selected
        slot ``s`` (always False at padding slots); each query head attends only to its own slots.

    Example::

        >>> sel = Selection(torch.tensor([[[3, 0, 7]]], dtype=torch.int32), torch.tensor([[2]], dtype=torch.int32))
        >>> sel.to_mask(8).int().tolist()
        [[[1, 0, 0, 1, 0, 0, 0, 0]]]
    """

    indices: torch.Tensor
    counts: torch.Tensor
    #: True when row (b, h) is exactly the contiguous range ``[start[b], start[b] + counts)`` in order,
    #: as ``Selection.full`` builds it; stages may then read the cache contiguously instead of gathering.
    is_full_range: bool = False
    #: When set, every row is whole pages of this many tokens, page after page (slot ``s`` belongs to the row's
    #: page ``s // page_size``; a partial last page ends the row), as Quest's selector builds it without left
    #: padding; the CPU estimator then reads the int4 keys page by page instead of token by token.
    page_size: int | None = None
    #: When set, every row holds exactly this many valid entries (known on the host: no read of ``counts``).
    uniform_count: int | None = None
    #: ``[B, Hkv, G, K_max]`` bool: which slots each query head selected (``selector.gqa="head"``), see above.
    head_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices.dim() != 3:
            raise ValueError(f"Selection.indices must be [B, Hkv, K_max], got shape {tuple(self.indices.shape)}")
        if self.counts.shape != self.indices.shape[:2]:
            raise ValueError(f"Selection.counts must be [B, Hkv] = {tuple(self.indices.shape[:2])}, "
                             f"got {tuple(self.counts.shape)}")
        if self.indices.dtype != torch.int32 or self.counts.dtype != torch.int32:
            raise ValueError(f"Selection indices/counts must be int32, got {self.indices.dtype}/{self.counts.dtype}")
        if self.head_mask is not None:
            m = self.head_mask
            if m.dtype != torch.bool or m.dim() != 4 or m.shape[:2] != self.indices.shape[:2] \
                    or m.shape[3] != self.indices.shape[2]:
                raise ValueError(f"Selection.head_mask must be bool [B, Hkv, G, K_max] with (B, Hkv, K_max) = "
                                 f"{(*self.indices.shape[:2], self.indices.shape[2])}, got {m.dtype} "
                                 f"{tuple(m.shape)}")
            if self.is_full_range:
                raise ValueError("a full-range Selection has no head_mask: every query head attends to every token")

    @property
    def k_max(self) -> int:
        return self.indices.shape[-1]

    def valid(self) -> torch.Tensor:
        """``[B, Hkv, K_max]`` bool: which entries of ``indices`` are real."""
        ar = torch.arange(self.k_max, device=self.indices.device)
        return ar < self.counts.unsqueeze(-1)

    def to_mask(self, length: int) -> torch.Tensor:
        """``[B, Hkv, length]`` bool mask of selected positions (the union over query heads; for tests and
        debugging)."""
        B, H, _ = self.indices.shape
        mask = torch.zeros(B, H, length + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.valid(), self.indices.long(), length)  # padding goes to a spill column
        mask.scatter_(-1, idx, True)
        return mask[..., :length]

    def head_valid(self, group: int) -> torch.Tensor:
        """``[B, Hkv, G, K_max]`` bool: which slots each of the ``group`` query heads of a kv-head attends to
        (``head_mask``, or every valid slot for every head when there is none)."""
        if self.head_mask is not None:
            if self.head_mask.shape[2] != group:
                raise ValueError(f"Selection.head_mask holds {self.head_mask.shape[2]} query heads per kv-head, "
                                 f"not {group}")
            return self.head_mask
        B, H, K = self.indices.shape
        return self.valid().unsqueeze(2).expand(B, H, group, K)

    def to_head_mask(self, length: int, group: int) -> torch.Tensor:
        """``[B, Hkv * group, length]`` bool mask of the positions each query head attends to."""
        B, H, K = self.indices.shape
        mask = torch.zeros(B, H, group, length + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.head_valid(group), self.indices.long().unsqueeze(2), length)
        mask.scatter_(-1, idx, True)
        return mask[..., :length].reshape(B, H * group, length)

    def to_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indptr [B*Hkv + 1], indices [nnz])`` int32, rows ordered (batch, kv-head).

        This is the page table of a paged KV cache with page size 1, as FlashInfer's decode kernels take it
        (each (batch, kv-head) row treated as one request).
        """
        counts = self.counts.reshape(-1)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
        indptr[1:] = torch.cumsum(counts, 0)
        flat = self.indices.reshape(-1, self.k_max)[self.valid().reshape(-1, self.k_max)]
        return indptr, flat.to(torch.int32)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Selection":
        """Build from a ``[B, Hkv, L]`` bool mask; indices come out ascending."""
        counts = mask.sum(-1, dtype=torch.int32)
        k_max = max(int(counts.max()) if counts.numel() else 0, 1)
        # Stable sort puts the selected positions first, in ascending order.
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :k_max]
        return cls(order.to(torch.int32), counts)

    @classmethod
    def full(cls, batch: int, heads: int, length: int, device=None, start: torch.Tensor | None = None) -> "Selection":
        """Every position in ``[start[b], length)`` of every head (all of ``[0, length)`` by default)."""
        idx = torch.arange(length, device=device, dtype=torch.int32).expand(batch, heads, length)
        if start is None:
            counts = torch.full((batch, heads), length, dtype=torch.int32, device=device)
            return cls(idx.contiguous(), counts, is_full_range=True, uniform_count=length)
        start = start.to(device=device, dtype=torch.int32).view(batch, 1, 1)
        idx = (idx + start).clamp_max(max(length - 1, 0))
        counts = (length - start.view(batch, 1)).clamp_min(0).expand(batch, heads).to(torch.int32).contiguous()
        return cls(idx.contiguous(), counts, is_full_range=True)

    @classmethod
    def every_valid(cls, cache, device=None) -> "Selection":
        """Every valid token of ``cache`` (a ``LayerCache``) for each of its kv-heads: ``full`` from each sequence's
        first valid position, or of all of ``[0, length)`` when no sequence is padded (known on the host)."""
        return cls.full(cache.batch, cache.num_kv_heads, cache.length, device=device or cache.device,
                        start=cache.start if cache.max_start else None)
