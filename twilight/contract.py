"""The backend contract: what a backend implements, and the per-step plan the pipeline hands it.

A decode step of one layer is the same calls for every backend (``TwilightPipeline.decode``):

1. stage 1, select: the selector's own code, ``selector(q, cache, plan) -> Selection`` (Quest pages, a window, ...),
   or the backend's fused kernel for that selector type (``Backend.select_kernels``);
2. ``prune(q, cache, sel, estimator, pruner, scale, plan) -> (Selection, q_counts)``: estimate the candidates'
   scores and keep, per query head, what the pruner keeps; the GQA group's union per kv-head, compacted;
3. ``attend(q, cache, sel, scale, plan) -> out``: decode attention over the pruned selection with the exact K/V.

The pipeline calls 2 and 3 through ``prune_attend`` (by default: ``prune``, then ``attend``), which a backend
that fuses them overrides (``cpu``). A layer the plan says is dense this step (``StepPlan.is_dense``) calls
``attend`` only, over every token. Each stage receives its own config section (``EstimatorConfig``,
``PrunerConfig``), and every method the step's plan: the plan is required below the pipeline's public entry points.

Under ``selector.gqa="head"`` the selection carries ``Selection.head_mask`` (each query head's own candidates):
``prune`` masks every query head's scores to its own candidates and keeps the mask through the union
(``prune_heads``), and ``attend`` lets each query head attend to its own slots only. The reference
(``twilight.kernels.reference.TorchBackend``) implements it; the kernel backends run those stages with it (their
kernels implement ``"group"`` and refuse a ``head_mask`` by name).

Plus the primitives the stages are built from, which benchmarks and tests time and check one by one:
``quest_page_scores``, ``estimate``, ``prune_top_p``, ``prune_to_selection``.

``StepPlan`` is computed once per decode step for all layers (``TwilightPipeline.plan``, or ``StepPlan.for_cache``
outside a pipeline): the host-side numbers (length, padding extremes, which layers attend densely this step, host
reads), so that the per-layer calls do no host-side bookkeeping of their own.

Host reads. On the CPU, reading a count from a tensor is reading memory, and sizing the sparse attention
to the tokens actually kept is what makes it fast; on a GPU the same read waits for the device. Backends therefore
size tensors from counts only when ``plan.host_reads`` is true, which plans default to for CPU tensors; otherwise
every shape comes from host-known sizes and a step makes no host synchronisation.

This module imports no stage: the reference is ``twilight.kernels.reference``, the registry of backends
``twilight.backends``.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from twilight.cache import LayerCache
    from twilight.config import EstimatorConfig, PrunerConfig
    from twilight.selection import Selection

__all__ = ["Backend", "BackendUnavailableError", "SelectKernel", "StepPlan"]


class BackendUnavailableError(RuntimeError):
    """The backend named in the config cannot run here; the message says why."""


@dataclass(frozen=True)
class StepPlan:
    """Host-side facts of one decode step, shared by every layer (all layers hold the same positions).

    length: positions written in each layer's cache (padding included) when the step attends.
    min_start, max_start: extremes of the sequences' first valid positions (left padding).
    all_dense: every layer attends to every token this step: the step is below the config's crossover
        (``dense_below``), or the config selects every token and prunes nothing.
    dense_layers: the layers that attend to every token whatever the step (the config's ``dense_layers``).
        ``is_dense(layer_idx)`` reads both: the one place a layer's step is decided dense.
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
    all_dense: bool = False
    dense_layers: frozenset[int] = frozenset()
    host_reads: bool = False
    traced: bool = False
    scale: float | None = None
    shared: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_cache(cls, cache: LayerCache, host_reads: bool | None = None, **fields: Any) -> StepPlan:
        """The plan of a step over ``cache``'s positions (every layer sparse unless ``dense_layers`` says otherwise).
        ``host_reads`` defaults to the cache being on the CPU; ``torch.compile`` tracing forces it off."""
        traced = torch.compiler.is_compiling()
        if traced:  # a traced step reads nothing back: a host read is a graph break
            host_reads = False
        elif host_reads is None:
            host_reads = cache.device.type == "cpu"
        return cls(cache.length, cache.min_start, cache.max_start, host_reads=host_reads, traced=traced, **fields)

    @property
    def longest(self) -> int:
        """Valid tokens of the longest sequence."""
        return self.length - self.min_start

    def is_dense(self, layer_idx: int) -> bool:
        """Does ``layer_idx`` attend to every token this step?"""
        return self.all_dense or layer_idx in self.dense_layers


#: A backend's fused stage 1 for one selector type: ``kernel(backend, selector, q, cache, plan) -> Selection``.
SelectKernel = Callable[["Backend", Any, torch.Tensor, "LayerCache", StepPlan], "Selection"]


class Backend(abc.ABC):
    """What a backend provides. Subclass ``twilight.kernels.reference.TorchBackend`` and override what you
    accelerate; register it in ``twilight.backends``."""

    name: str = "abstract"
    #: Device types on which a whole decode step of this backend is known to compile (``torch.compile``, 0 graph
    #: breaks): a ``TwilightCache`` says it is compileable there, so ``generate()`` may compile its decode step.
    compile_devices: tuple[str, ...] = ()
    #: Fused selection kernels by selector type (``selector.type``), for ``selector.gqa="group"``: the pipeline
    #: runs ``kernel(backend, selector, q, cache, plan)`` instead of ``selector(q, cache, plan)``. Other types, and
    #: ``gqa="head"``, run the selector's own code.
    select_kernels: Mapping[str, SelectKernel] = {}

    def int4_block(self, device: torch.device) -> int:
        """Tokens per tile of the int4 key layout this backend reads (the cache is built with it)."""
        from twilight.quant import INT4_TILE

        return INT4_TILE

    def token_updater(self, cache: LayerCache):
        """A fused update of one decode token's derived structures for ``cache`` (``None``: the cache's own)."""
        return None

    @abc.abstractmethod
    def prune(self, q: torch.Tensor, cache: LayerCache, sel: Selection, estimator: EstimatorConfig,
              pruner: PrunerConfig, scale: float, plan: StepPlan) -> tuple[Selection, torch.Tensor]:
        """Stage 2: estimate (``estimator``), prune per query head (``pruner``), union per kv-head. Returns the
        pruned selection and each query head's kept count ``[B, Hq]`` int32."""

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float,
               plan: StepPlan) -> torch.Tensor:
        """Stage 3: ``[B, Hq, D]`` attention of ``q`` over ``sel`` with the exact K/V."""

    def prune_attend(self, q: torch.Tensor, cache: LayerCache, sel: Selection, estimator: EstimatorConfig,
                     pruner: PrunerConfig, scale: float,
                     plan: StepPlan) -> tuple[torch.Tensor, Selection, torch.Tensor]:
        """Stages 2 and 3 in one call, as the pipeline runs them: ``(out, pruned selection, q_counts)``. A backend
        that fuses pruning with attention overrides this; the default is ``prune`` then ``attend``."""
        sel, q_counts = self.prune(q, cache, sel, estimator, pruner, scale, plan)
        return self.attend(q, cache, sel, scale, plan), sel, q_counts

    # primitives ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def quest_page_scores(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Quest's page upper bounds ``[B, Hkv, pages]``."""

    @abc.abstractmethod
    def estimate(self, q: torch.Tensor, cache: LayerCache, sel: Selection, kind: str, plan: StepPlan) -> torch.Tensor:
        """Approximate ``q·k`` of the candidates, ``[B, Hq, K]`` (``-inf`` at padding slots); ``kind`` is
        ``EstimatorConfig.type``."""

    @abc.abstractmethod
    def prune_top_p(self, logits: torch.Tensor, p) -> torch.Tensor:
        """Sorting-free top-p mask of ``logits [..., N]``."""

    @abc.abstractmethod
    def prune_to_selection(self, scores: torch.Tensor, sel: Selection, p, scale: float,
                           plan: StepPlan) -> tuple[Selection, torch.Tensor]:
        """Top-p per query head on ``scores * scale`` (``[B, Hq, K]``), union over each GQA group, compacted:
        ``(Selection [B, Hkv, K'], q_counts [B, Hq] int32)``."""

    @abc.abstractmethod
    def prune_heads(self, scores: torch.Tensor, sel: Selection, pruner: PrunerConfig, scale: float,
                    plan: StepPlan) -> tuple[Selection, torch.Tensor]:
        """``gqa="head"``: each query head's ``pruner`` over its own candidates (``sel.head_mask``), the union per
        kv-head compacted, each query head's kept slots carried in the new ``head_mask``."""
