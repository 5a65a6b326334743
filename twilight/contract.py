"""The backend contract: what every backend implements, and the per-step plan the pipeline hands it.

A decode step of one layer is the same calls for every backend (``TwilightPipeline.decode``):

1. ``select(q, cache, selector, plan) -> Selection``: the coarse candidates (Quest pages, a window, ...);
2. ``prune(q, cache, sel, config, scale, plan) -> (Selection, q_counts)``: estimate the candidates' scores
   and keep, per query head, what the pruner keeps; the GQA group's union per kv-head, compacted;
3. ``attend(q, cache, sel, scale) -> out``: decode attention over the pruned selection with the exact K/V.

Under ``selector.gqa="head"`` the selection carries ``Selection.head_mask`` (each query head's own candidates):
``prune`` masks every query head's scores to its own candidates and keeps the mask through the union, and
``attend`` lets each query head attend to its own slots only. ``TorchBackend`` implements it; the kernel backends
run those stages with it (their kernels implement ``"group"`` and refuse a ``head_mask`` by name).

The pipeline calls 2 and 3 through ``prune_attend`` (by default: ``prune``, then ``attend``), which a backend
that fuses them overrides (``cpu``). A dense step (dense layer, or below the crossover) calls ``attend`` only.

Plus the primitives the three are built from, which benchmarks and tests time and check one by one:
``quest_page_scores``, ``estimate``, ``prune_top_p``. ``TorchBackend`` (here) is the reference and runs
anywhere; the kernel backends (``twilight.kernels.*``) subclass it and replace what they accelerate, fused
entry points included, so there is one pipeline path for all of them.

``StepPlan`` is computed once per decode step for all layers (``TwilightPipeline.plan``): the host-side
numbers (length, padding extremes, Quest's page budget, whether the step is below the dense crossover),
so that the per-layer calls do no host-side bookkeeping of their own.

Host reads. On the CPU, reading a count from a tensor is reading memory, and sizing the sparse attention
to the tokens actually kept is what makes it fast; on a GPU the same read waits for the device. The torch
backend therefore sizes tensors from counts only when ``plan.host_reads`` is true, which ``plan`` sets for
CPU tensors; otherwise every shape comes from host-known sizes and a step makes no host synchronisation.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from twilight._tensors import compact, compact_heads
from twilight.attention import sparse_decode_attention
from twilight.cache import LayerCache
from twilight.estimate import cpu_int4_block, estimate_scores
from twilight.prune import prune_mask, top_p_kept, top_p_mask
from twilight.quant import INT4_TILE
from twilight.select import quest_page_scores
from twilight.selection import Selection

__all__ = ["Backend", "BackendUnavailableError", "TorchBackend", "StepPlan"]


class BackendUnavailableError(RuntimeError):
    """The backend named in the config cannot run here; the message says why."""


@dataclass(frozen=True)
class StepPlan:
    """Host-side facts of one decode step, shared by every layer (all layers hold the same positions).

    length: positions written in each layer's cache (padding included) when the step attends.
    min_start, max_start: extremes of the sequences' first valid positions (left padding).
    dense: the step is below the config's crossover (``dense_below``): every layer attends densely.
    host_reads: backends may read counts from tensors to size their work (CPU tensors only).
    traced: ``torch.compile`` is capturing this step (``host_reads`` is then false): no host reads and no Python
        branch on tensor values, but registered operators (``torch.ops.*``) are fine, whatever ``host_reads`` says.
    scale: the attention's softmax scale (selectors that weigh tokens by attention read it; ``None``: 1/sqrt(D)).
    shared: what one layer's selector hands to later layers of the same step (tidal's re-selected tokens); the
        one mutable part of the plan, which is why every layer of a step must get the same plan.
    """

    length: int
    min_start: int = 0
    max_start: int = 0
    dense: bool = False
    host_reads: bool = False
    traced: bool = False
    scale: float | None = None
    shared: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def longest(self) -> int:
        """Valid tokens of the longest sequence."""
        return self.length - self.min_start


class Backend(abc.ABC):
    """What a backend provides. Subclass ``TorchBackend`` and override what you accelerate."""

    name: str = "abstract"
    #: Device types on which a whole decode step of this backend is known to compile (``torch.compile``, 0 graph
    #: breaks): a ``TwilightCache`` says it is compileable there, so ``generate()`` may compile its decode step.
    compile_devices: tuple[str, ...] = ()

    def int4_block(self, device: torch.device) -> int:
        """Tokens per tile of the int4 key layout this backend reads (the cache is built with it)."""
        return INT4_TILE

    def token_updater(self, cache: LayerCache):
        """A fused update of one decode token's derived structures for ``cache`` (``None``: the cache's own)."""
        return None

    @abc.abstractmethod
    def select(self, q: torch.Tensor, cache: LayerCache, selector, plan: StepPlan) -> Selection:
        """Stage 1: the candidate `Selection` of ``selector`` (a callable from ``twilight.select``)."""

    @abc.abstractmethod
    def prune(self, q: torch.Tensor, cache: LayerCache, sel: Selection, config, scale: float,
              plan: StepPlan) -> tuple[Selection, torch.Tensor]:
        """Stages 2 and 3: estimate, prune per query head, union per kv-head. Returns the pruned selection and
        each query head's kept count ``[B, Hq]`` int32."""

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float,
               plan: StepPlan | None = None) -> torch.Tensor:
        """Stage 4: ``[B, Hq, D]`` attention of ``q`` over ``sel`` with the exact K/V."""

    def prune_attend(self, q: torch.Tensor, cache: LayerCache, sel: Selection, config, scale: float,
                     plan: StepPlan) -> tuple[torch.Tensor, Selection, torch.Tensor]:
        """Stages 2 to 4 in one call, as the pipeline runs them: ``(out, pruned selection, q_counts)``. A backend
        that fuses pruning with attention overrides this; the default is ``prune`` then ``attend``."""
        sel, q_counts = self.prune(q, cache, sel, config, scale, plan)
        return self.attend(q, cache, sel, scale, plan), sel, q_counts

    # primitives ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def quest_page_scores(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Quest's page upper bounds ``[B, Hkv, pages]``."""

    @abc.abstractmethod
    def estimate(self, q: torch.Tensor, cache: LayerCache, sel: Selection, kind: str,
                 plan: StepPlan | None = None) -> torch.Tensor:
        """Approximate ``q·k`` of the candidates, ``[B, Hq, K]`` (``-inf`` at padding slots)."""

    @abc.abstractmethod
    def prune_top_p(self, logits: torch.Tensor, p) -> torch.Tensor:
        """Sorting-free top-p mask of ``logits [..., N]``."""


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

    def select(self, q, cache, selector, plan):
        return selector(q, cache, plan)

    def prune(self, q, cache, sel, config, scale, plan):
        scores = self.estimate(q, cache, sel, config.estimator.type, plan)  # [B, Hq, K] raw q·k
        if sel.head_mask is not None:  # gqa="head": each query head prunes its own candidates
            return self.prune_heads(scores, sel, config.pruner, scale, plan)
        if config.pruner.type == "top_p":
            return self.prune_to_selection(scores, sel, config.pruner.p, scale, plan)
        keep = prune_mask(scores * scale, config.pruner)
        return self._union_compact(keep, sel, cache.num_kv_heads, plan)

    def prune_to_selection(self, scores: torch.Tensor, sel: Selection, p, scale: float = 1.0,
                           plan: StepPlan | None = None) -> tuple[Selection, torch.Tensor]:
        """Top-p per query head on ``scores * scale``, union over each GQA group, compacted."""
        host_reads = plan.host_reads if plan is not None else scores.device.type == "cpu"
        logits = scores * scale
        if host_reads:
            kept = top_p_kept(logits.view(-1, logits.shape[-1]), p)
            if kept is not None:
                return _selection_from_kept(kept, sel, logits.shape[1])
        keep = top_p_mask(logits, p, host_reads=host_reads)
        return self._union_compact(keep, sel, sel.indices.shape[1], plan)

    def prune_heads(self, scores: torch.Tensor, sel: Selection, pruner, scale: float = 1.0,
                    plan: StepPlan | None = None) -> tuple[Selection, torch.Tensor]:
        """``gqa="head"``: each query head's ``pruner`` over its own candidates (``sel.head_mask``; the others score
        ``-inf``), the union per kv-head compacted, each query head's kept slots carried in the new ``head_mask``.
        Always the torch reference (every backend), whatever the backend's kernels."""
        B, Hq, K = scores.shape
        H = sel.indices.shape[1]
        G = Hq // H
        logits = (scores * scale).masked_fill(~sel.head_valid(G).reshape(B, Hq, K), float("-inf"))
        host_reads = plan.host_reads if plan is not None else scores.device.type == "cpu"
        if pruner.type == "top_p":
            keep = top_p_mask(logits, pruner.p, host_reads=host_reads)
        else:
            keep = prune_mask(logits, pruner)
        indices, counts, head_mask = compact_heads(sel.indices, keep.view(B, H, G, K),
                                                   width=None if host_reads else K)
        return Selection(indices, counts, head_mask=head_mask), keep.sum(-1, dtype=torch.int32)

    @staticmethod
    def _union_compact(keep: torch.Tensor, sel: Selection, num_kv_heads: int, plan: StepPlan | None):
        B, Hq, K = keep.shape
        keep_kv = keep.view(B, num_kv_heads, Hq // num_kv_heads, K).any(2)  # union over the group
        host_reads = plan.host_reads if plan is not None else keep.device.type == "cpu"
        indices, counts = compact(sel.indices, keep_kv, width=None if host_reads else K)
        return Selection(indices, counts), keep.sum(-1, dtype=torch.int32)

    def attend(self, q, cache, sel, scale, plan=None):
        host_reads = plan.host_reads if plan is not None else q.device.type == "cpu"
        return sparse_decode_attention(q, cache, sel, scale, host_reads=host_reads)

    def quest_page_scores(self, q, cache):
        return quest_page_scores(q, cache)

    def estimate(self, q, cache, sel, kind, plan=None):
        host_reads = plan.host_reads if plan is not None else q.device.type == "cpu"
        return estimate_scores(q, cache, sel, kind, host_reads=host_reads)

    def prune_top_p(self, logits, p):
        return top_p_mask(logits, p)
