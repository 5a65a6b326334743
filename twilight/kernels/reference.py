"""The ``torch`` backend: every stage of the contract (``twilight.contract.Backend``) in PyTorch, on any device.

It is the reference the kernel backends are tested against, and their base class: ``cpu``, ``triton``, ``cuda`` and
``flashinfer`` (``twilight.kernels.*``) subclass it and override what they accelerate, so there is one pipeline path
for all of them.
"""
from __future__ import annotations

import torch

from twilight._tensors import compact, compact_heads
from twilight.attention import sparse_decode_attention
from twilight.contract import Backend, StepPlan
from twilight.estimate import cpu_int4_block, estimate_scores
from twilight.prune import prune_mask, top_p_kept, top_p_mask
from twilight.quant import INT4_TILE
from twilight.select import quest_page_scores
from twilight.selection import Selection

__all__ = ["TorchBackend"]


def _selection_from_kept(kept, sel: Selection, num_q_heads: int) -> tuple[Selection, torch.Tensor]:
    """The pruned `Selection` from ``top_p_kept``'s coordinates over the rows ``[B * Hq]`` of ``sel``'s slots:
    each kv-head keeps the union of its query heads' slots, ascending (host reads: CPU only)."""
    row, col, q_counts = kept
    B, H, K = sel.indices.shape
    G = num_q_heads // H
    key = torch.unique((row // G) * K + col)  # (b * H + h) * K + slot, sorted: the union per kv-head
    kv_row, slot = key // K, key % K
    counts = torch.bincount(kv_row, minlength=B * H)
    width = max(int(counts.max()), 1)
    pos = torch.arange(key.numel()) - (torch.cumsum(counts, 0) - counts).index_select(0, kv_row)
    out = torch.zeros(B * H, width, dtype=torch.int32)  # padding reads position 0, a valid storage slot
    out.index_put_((kv_row, pos), sel.indices.view(B * H, K)[kv_row, slot])
    return Selection(out.view(B, H, width), counts.to(torch.int32).view(B, H)), q_counts.to(torch.int32).view(B, -1)


class TorchBackend(Backend):
    """The reference: every stage in PyTorch, on any device."""

    name = "torch"
    # On the CPU the step compiles with symbolic lengths. Not on CUDA yet: there generate() compiles by itself with
    # CUDA graphs, which record one graph per distinct length unless lengths are device tensors and every shape is
    # fixed by capacity and budget (docs/design/compiled-decode.md).
    compile_devices = ("cpu",)

    def int4_block(self, device: torch.device) -> int:
        # On the CPU the cache keeps PyTorch's own int4 GEMV layout (32- or 64-token blocks by CPU), so keys
        # are scored in place without repacking.
        if torch.device(device).type == "cpu":
            return cpu_int4_block() or INT4_TILE
        return INT4_TILE

    def prune(self, q, cache, sel, estimator, pruner, scale, plan):
        scores = self.estimate(q, cache, sel, estimator.type, plan)  # [B, Hq, K] raw q·k
        if sel.head_mask is not None:  # gqa="head": each query head prunes its own candidates
            return self.prune_heads(scores, sel, pruner, scale, plan)
        if pruner.type == "top_p":
            return self.prune_to_selection(scores, sel, pruner.p, scale, plan)
        keep = prune_mask(scores * scale, pruner)
        return self._union_compact(keep, sel, cache.num_kv_heads, plan)

    def prune_to_selection(self, scores, sel, p, scale, plan):
        host_reads = plan.host_reads
        logits = scores * scale
        if host_reads:
            kept = top_p_kept(logits.view(-1, logits.shape[-1]), p)
            if kept is not None:
                return _selection_from_kept(kept, sel, logits.shape[1])
        keep = top_p_mask(logits, p, host_reads=host_reads)
        return self._union_compact(keep, sel, sel.indices.shape[1], plan)

    def prune_heads(self, scores, sel, pruner, scale, plan):
        """The other query heads' candidates score ``-inf``; every backend runs this reference (its kernels share
        a row between a group's query heads)."""
        B, Hq, K = scores.shape
        H = sel.indices.shape[1]
        G = Hq // H
        logits = (scores * scale).masked_fill(~sel.head_valid(G).reshape(B, Hq, K), float("-inf"))
        host_reads = plan.host_reads
        if pruner.type == "top_p":
            keep = top_p_mask(logits, pruner.p, host_reads=host_reads)
        else:
            keep = prune_mask(logits, pruner)
        indices, counts, head_mask = compact_heads(sel.indices, keep.view(B, H, G, K),
                                                   width=None if host_reads else K)
        return Selection(indices, counts, head_mask=head_mask), keep.sum(-1, dtype=torch.int32)

    @staticmethod
    def _union_compact(keep: torch.Tensor, sel: Selection, num_kv_heads: int, plan: StepPlan):
        B, Hq, K = keep.shape
        keep_kv = keep.view(B, num_kv_heads, Hq // num_kv_heads, K).any(2)  # union over the group
        indices, counts = compact(sel.indices, keep_kv, width=None if plan.host_reads else K)
        return Selection(indices, counts), keep.sum(-1, dtype=torch.int32)

    def attend(self, q, cache, sel, scale, plan):
        return sparse_decode_attention(q, cache, sel, scale, host_reads=plan.host_reads)

    def quest_page_scores(self, q, cache):
        return quest_page_scores(q, cache)

    def estimate(self, q, cache, sel, kind, plan):
        return estimate_scores(q, cache, sel, kind, host_reads=plan.host_reads)

    def prune_top_p(self, logits, p):
        return top_p_mask(logits, p)
