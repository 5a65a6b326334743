"""The ``triton`` backend: Triton kernels for every stage of the Twilight pipeline.

==========================  ==========================================================================
module                      kernels
==========================  ==========================================================================
``quest``                   Quest page bounds ``[B, Hkv, pages]``; top-page selection into a `Selection`
``spgemv``                  int4 SpGEMV: estimated ``q·k`` of the candidates from the packed K cache
``top_p``                   exact sorting-free top-p (mask), fused with GQA union + compaction
``attention``               sparse flash-decoding over a `Selection`, split by tokens, then merged
``append``                  a decode token's int4 codes, scale/mid and Quest page bounds in one launch
==========================  ==========================================================================

``TritonBackend`` implements the backend contract (``twilight.contract``) by overriding the `TorchBackend`
operations it accelerates: the fused Quest selection for a Quest selector (``select_kernels["quest"]``), ``prune``
the int4 SpGEMV (``estimate`` for ``kind="int4"``; other kinds fall back to torch) and the fused top-p -> GQA union
-> compaction (``prune_to_selection``), ``attend`` the sparse flash-decoding kernels. Every output width comes
from host-known sizes, so a step reads nothing back from the device.

The kernels implement ``selector.gqa="group"`` (a kv-head's selection shared by its query heads) and refuse a
``Selection.head_mask`` by name; under ``gqa="head"`` the backend runs selection, pruning and attention with the
torch reference (``TorchBackend``) and only the int4 estimate in Triton (it scores every query head anyway).

On a machine without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before import).
"""
from __future__ import annotations

import torch

from twilight.kernels.reference import TorchBackend
from twilight.kernels.triton.append import supports as supports_token_update
from twilight.kernels.triton.append import update_token
from twilight.kernels.triton.attention import sparse_decode_attention
from twilight.kernels.triton.quest import quest_page_scores, quest_select
from twilight.kernels.triton.spgemv import int4_scores
from twilight.kernels.triton.top_p import prune_to_selection, top_p_mask
from twilight.quant import INT4_TILE

__all__ = ["TritonBackend", "quest_page_scores", "quest_select", "int4_scores", "top_p_mask", "prune_to_selection",
           "sparse_decode_attention"]


def _quest(backend, selector, q: torch.Tensor, cache, plan):
    """Quest's stage 1 in one fused kernel (per kv-head: ``gqa="group"``)."""
    return quest_select(q, cache, selector.budget, selector.page_size)


class TritonBackend(TorchBackend):
    """Triton kernels for Quest scoring/selection, int4 estimation, top-p pruning and sparse attention."""

    name = "triton"
    compile_devices = ()  # its launches are not registered operators yet (torch.library.triton_op)
    select_kernels = {"quest": _quest}

    def int4_block(self, device) -> int:
        return INT4_TILE  # the kernels address 64-token tiles

    def token_updater(self, cache):
        return update_token if supports_token_update(cache) else None

    def quest_page_scores(self, q: torch.Tensor, cache) -> torch.Tensor:
        return quest_page_scores(q, cache)

    def quest_select(self, q: torch.Tensor, cache, token_budget: int, page_size: int | None = None):
        """Quest's candidate `Selection` (see ``twilight.kernels.triton.quest.quest_select``)."""
        return quest_select(q, cache, token_budget, page_size)

    def estimate(self, q: torch.Tensor, cache, sel, kind: str, plan) -> torch.Tensor:
        if kind == "int4":
            return int4_scores(q, cache, sel)
        return super().estimate(q, cache, sel, kind, plan)

    def prune_top_p(self, logits: torch.Tensor, p) -> torch.Tensor:
        return top_p_mask(logits, p)

    def prune_to_selection(self, scores: torch.Tensor, sel, p, scale: float, plan):
        """Fused top-p → GQA union → compacted `Selection` (see ``twilight.kernels.triton.top_p``)."""
        return prune_to_selection(scores, sel, p, scale)

    def attend(self, q: torch.Tensor, cache, sel, scale: float, plan) -> torch.Tensor:
        if sel.head_mask is not None:  # gqa="head": the kernel shares a row between a group's query heads
            return super().attend(q, cache, sel, scale, plan)
        return sparse_decode_attention(q, cache, sel, scale)
