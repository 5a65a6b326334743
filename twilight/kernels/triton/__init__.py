"""The ``triton`` backend: Triton kernels for every stage of the Twilight pipeline.

==========================  ==========================================================================
module                      kernels
==========================  ==========================================================================
``quest``                   Quest page bounds ``[B, Hkv, pages]``; top-page selection into a `Selection`
``spgemv``                  int4 SpGEMV: estimated ``q·k`` of the candidates from the packed K cache
``top_p``                   exact sorting-free top-p (mask), fused with GQA union + compaction
``attention``               sparse flash-decoding over a `Selection`, split by tokens, then merged
==========================  ==========================================================================

``TritonBackend`` overrides the `TorchBackend` operations with the same signatures (``estimate`` for
``kind="int4"``; other kinds fall back to torch) and adds two fused entry points the pipeline uses when a
backend has them: ``quest_select`` and ``prune_to_selection``.

On a machine without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""
from __future__ import annotations

import torch

from twilight.backends import TorchBackend
from twilight.kernels.triton.attention import sparse_decode_attention
from twilight.kernels.triton.quest import quest_page_scores, quest_select
from twilight.kernels.triton.spgemv import int4_scores
from twilight.kernels.triton.top_p import prune_to_selection, top_p_mask

__all__ = ["TritonBackend", "quest_page_scores", "quest_select", "int4_scores", "top_p_mask", "prune_to_selection",
           "sparse_decode_attention"]


class TritonBackend(TorchBackend):
    """Triton kernels for Quest scoring/selection, int4 estimation, top-p pruning and sparse attention."""

    name = "triton"

    def quest_page_scores(self, q: torch.Tensor, cache) -> torch.Tensor:
        return quest_page_scores(q, cache)

    def quest_select(self, q: torch.Tensor, cache, token_budget: int, page_size: int | None = None):
        """Quest's candidate `Selection` (see ``twilight.kernels.triton.quest.quest_select``)."""
        return quest_select(q, cache, token_budget, page_size)

    def estimate(self, q: torch.Tensor, cache, sel, kind: str) -> torch.Tensor:
        if kind == "int4":
            return int4_scores(q, cache, sel)
        return super().estimate(q, cache, sel, kind)

    def prune_top_p(self, logits: torch.Tensor, p) -> torch.Tensor:
        return top_p_mask(logits, p)

    def prune_to_selection(self, scores: torch.Tensor, sel, p, scale: float = 1.0):
        """Fused top-p → GQA union → compacted `Selection` (see ``twilight.kernels.triton.top_p``)."""
        return prune_to_selection(scores, sel, p, scale)

    def attend(self, q: torch.Tensor, cache, sel, scale: float) -> torch.Tensor:
        return sparse_decode_attention(q, cache, sel, scale)
