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

    def __post_init__(self) -> None:
        if self.indices.dim() != 3:
            raise ValueError(f"Selection.indices must be [B, Hkv, K_max], got shape {tuple(self.indices.shape)}")
        if self.counts.shape != self.indices.shape[:2]:
            raise ValueError(f"Selection.counts must be [B, Hkv] = {tuple(self.indices.shape[:2])}, "
                             f"got {tuple(self.counts.shape)}")
        if self.indices.dtype != torch.int32 or self.counts.dtype != torch.int32:
            raise ValueError(f"Selection indices/counts must be int32, got {self.indices.dtype}/{self.counts.dtype}")

    @property
    def k_max(self) -> int:
        return self.indices.shape[-1]

    def valid(self) -> torch.Tensor:
        """``[B, Hkv, K_max]`` bool: which entries of ``indices`` are real."""
        ar = torch.arange(self.k_max, device=self.indices.device)
        return ar < self.counts.unsqueeze(-1)

    def to_mask(self, length: int) -> torch.Tensor:
        """``[B, Hkv, length]`` bool mask of selected positions (for tests and debugging)."""
        B, H, _ = self.indices.shape
        mask = torch.zeros(B, H, length + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.valid(), self.indices.long(), length)  # padding goes to a spill column
        mask.scatter_(-1, idx, True)
        return mask[..., :length]

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
