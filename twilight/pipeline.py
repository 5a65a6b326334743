"""`TwilightPipeline`: the one place that chains Select → Estimate → Prune → Attend.

One pipeline serves every layer of a model. ``new_cache`` builds a layer's ``LayerCache`` with what the
config's selector and estimator need; ``decode`` runs one decode step of one layer and records the
budget in ``stats``. Layers in ``config.dense_layers`` (and every layer under a dense config) attend to
all tokens; so does every layer of a step whose context is below the crossover ``config.dense_below``.

Every backend runs the same path (``twilight.contract``): ``plan`` once per step (which also decides which
layers attend densely this step), then per layer the selector (or the backend's fused kernel for it) ->
``backend.prune`` -> ``backend.attend``.

Example::

    >>> pipe = TwilightPipeline("quest-twilight", num_layers=4, num_q_heads=8, num_kv_heads=2)
    >>> cache = pipe.new_cache(layer_idx=2, batch=1, num_kv_heads=2, head_dim=64)
    >>> cache.append(torch.randn(1, 2, 500, 64), torch.randn(1, 2, 500, 64))
    >>> pipe.decode(2, torch.randn(1, 8, 64), cache, scale=0.125).shape
    torch.Size([1, 8, 64])
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from twilight.backends import resolve_backend
from twilight.cache import LayerCache
from twilight.config import TwilightConfig
from twilight.contract import StepPlan
from twilight.select import check_model, make_selector, observation_key, selector_cache_needs
from twilight.selection import Selection
from twilight.stats import BudgetStats


class TwilightPipeline:
    def __init__(self, config, num_layers: int, num_q_heads: int, num_kv_heads: int):
        self.config = TwilightConfig.load(config)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        bad = [i for i in self.config.dense_layers if i >= num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range: the model has {num_layers} layers "
                             f"(0..{num_layers - 1})")
        self.num_layers, self.num_q_heads, self.num_kv_heads = num_layers, num_q_heads, num_kv_heads
        if not self.config.is_dense:
            check_model(self.config, num_layers)  # the selector's own check (tidal: its re-selection layers)
        self.stats = BudgetStats(num_layers, num_q_heads, num_kv_heads)
        self._selectors: dict[int, object] = {}
        self._observes = observation_key(self.config) is not None
        self._stages: dict[tuple, object] = {}
        self._backends: dict[torch.device, object] = {}
        self._dense_layers = frozenset(self.config.dense_layers)  # handed to every step's plan as it is
        #: May backends read counts back to size their work? ``None``: where the cache lives on the CPU. ``False``
        #: runs the fixed-shape path a GPU runs (tests count its synchronisations on the CPU).
        self.host_reads: bool | None = None
        #: dtype of Quest's page bounds in the caches made from now on. ``None``: the cache's own dtype (exact
        #: bounds); ``torch.bfloat16`` halves the bytes Quest reads from a float32 cache, rounded outward. The
        #: same for every backend and every CPU, so it never changes which pages a layer picks behind your back.
        self.bounds_dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ setup
    def is_dense(self, layer_idx: int) -> bool:
        """Does ``layer_idx`` attend densely at every step (a dense layer, or a dense config)? Such a layer's cache
        keeps no derived structures. Whether a layer attends densely at one step is its plan's
        (``StepPlan.is_dense``)."""
        return self.config.is_dense or layer_idx in self._dense_layers

    def backend(self, device: torch.device):
        """The config's backend on ``device`` (resolved once per device; an unavailable one raises)."""
        device = torch.device(device)
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.config.backend, device)
        return self._backends[device]

    def new_cache(self, layer_idx: int, batch: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  start: torch.Tensor | None = None, capacity: int = 0) -> LayerCache:
        """A ``LayerCache`` holding what this layer's stages read (nothing extra for dense layers), in the layout
        the backend reads. Its derived structures (int4 keys, page bounds, labels) are built when a sparse step
        first needs them, so contexts that stay below the dense crossover never pay for them. ``capacity``: the
        final length when known (allocated once, at that length), 0 to grow as needed."""
        backend = self.backend(device)  # fail early on an unavailable backend
        dense = self.is_dense(layer_idx)
        sel = self.config.selector
        needs = {} if dense else selector_cache_needs(sel, layer_idx, num_kv_heads)  # Quest's bounds, ds's labels
        cache = LayerCache(batch, num_kv_heads, head_dim, dtype=dtype, device=device, page_size=sel.page_size,
                          quant_bits=None if dense else self.config.estimator.bits,
                          keep_page_bounds=needs.get("keep_page_bounds", False),
                          label_channels=needs.get("label_channels"),
                          label_bits=needs.get("label_bits"), start=start, initial_capacity=capacity,
                          int4_block=backend.int4_block(torch.device(device)), lazy_derived=True,
                          bounds_dtype=self.bounds_dtype)
        cache.token_updater = backend.token_updater(cache)
        if not dense:  # resolved now, eagerly: a compiled step must not be the first to fill the table
            self._stage1(layer_idx, backend)
        return cache

    def _selector(self, layer_idx: int):
        if layer_idx not in self._selectors:
            self._selectors[layer_idx] = make_selector(self.config.selector, layer_idx, self.num_layers)
        return self._selectors[layer_idx]

    def _stage1(self, layer_idx: int, backend):
        """Stage 1 of ``layer_idx`` on ``backend``: the backend's fused kernel for the selector's type
        (``Backend.select_kernels``, ``gqa="group"`` only) bound to the selector, else the selector itself."""
        key = (layer_idx, backend)
        if key not in self._stages:
            cfg, selector = self.config.selector, self._selector(layer_idx)
            kernel = backend.select_kernels.get(cfg.type) if cfg.gqa == "group" else None
            self._stages[key] = selector if kernel is None else functools.partial(kernel, backend, selector)
        return self._stages[key]

    # ------------------------------------------------------------------ one step
    def plan(self, cache: LayerCache, host_reads: bool | None = None, scale: float | None = None) -> StepPlan:
        """The step plan shared by every layer of one decode step (all layers hold the same positions).

        ``host_reads`` (default: the cache is on the CPU) lets backends size their work from tensor counts;
        ``False`` keeps every shape host-known, as on a GPU (no synchronisation). ``scale``: the attention's
        softmax scale (``decode`` fills it in when omitted).
        """
        if host_reads is None and self.host_reads is not None:
            host_reads = self.host_reads
        longest = cache.length - cache.min_start
        all_dense = self.config.is_dense or longest < self.config.crossover(cache.device)
        return StepPlan.for_cache(cache, host_reads, all_dense=all_dense,
                                  dense_layers=self._dense_layers, scale=scale)

    def compileable(self, device: torch.device | str) -> bool:
        """Does a whole decode step of this pipeline compile on ``device`` (``torch.compile``, no graph break)? True
        where the config's backend says so (``Backend.compile_devices``: the ``torch`` and ``cpu`` backends on a
        CPU)."""
        device = torch.device(device)
        return device.type in self.backend(device).compile_devices

    def observe(self, layer_idx: int, q: torch.Tensor, cache: LayerCache, scale: float) -> None:
        """Show the selector of ``layer_idx`` the queries ``q [B, Hq, T, D]`` of a multi-token forward (prefill or a
        chunk of it) whose K/V ``cache`` already holds as its last ``T`` tokens. Selectors that choose tokens
        from the prompt's attention (``snapkv``, ``h2o``) record what they need; the others ignore it."""
        if self._observes and not self.is_dense(layer_idx):  # its registered spec says what it watches
            self._selector(layer_idx).observe(q, cache, scale)

    def select(self, layer_idx: int, q: torch.Tensor, cache: LayerCache, plan: StepPlan | None = None) -> Selection:
        """Stage 1: the candidate ``Selection`` (every valid token where the plan says the layer is dense)."""
        plan = plan or self.plan(cache)
        if plan.is_dense(layer_idx):
            if plan.traced and not self.is_dense(layer_idx):
                cache.update_derived()  # one token (see TwilightCache.prepare_decode): one shape across the crossover
            return Selection.every_valid(cache, device=q.device)
        cache.update_derived()
        return self._stage1(layer_idx, self.backend(q.device))(q, cache, plan)

    def prune(self, q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float,
              plan: StepPlan | None = None) -> tuple[Selection, torch.Tensor]:
        """Stage 2: estimate the candidates' scores, prune per query head, union per kv-head.

        Returns the pruned selection and the kept-token count of every query head ``[B, Hq]``.
        """
        return self.backend(q.device).prune(q, cache, sel, self.config.estimator, self.config.pruner, scale,
                                            plan or self.plan(cache))

    def decode(self, layer_idx: int, q: torch.Tensor, cache: LayerCache, scale: float,
               plan: StepPlan | None = None) -> torch.Tensor:
        """One decode step of one layer: ``q [B, Hq, D]`` -> attention output ``[B, Hq, D]``.

        ``plan``: this step's ``StepPlan`` (``self.plan(cache)``), computed once and passed to every layer;
        built here when omitted (a ``tidal`` selector needs the same plan in every layer of a step).
        """
        if q.dim() != 3 or q.shape[1] != self.num_q_heads:
            raise ValueError(f"q must be [B, Hq={self.num_q_heads}, D], got {tuple(q.shape)}")
        plan = plan or self.plan(cache, scale=scale)
        if plan.scale is None:
            plan = dataclasses.replace(plan, scale=scale)  # the same `shared` dict: layers still hand over
        backend = self.backend(q.device)
        dense = plan.is_dense(layer_idx)
        sel = self.select(layer_idx, q, cache, plan)
        if dense or self.config.pruner.type == "none":
            # each query head attends to its kv-head's selection, or (gqa="head") to its own part of it
            q_counts = None if sel.head_mask is None else sel.head_mask.sum(-1, dtype=torch.int32).view(q.shape[:2])
            out = backend.attend(q, cache, sel, scale, plan)
        else:
            out, sel, q_counts = backend.prune_attend(q, cache, sel, self.config.estimator, self.config.pruner,
                                                      scale, plan)
        self.stats.record(layer_idx, q_counts, sel.counts, (plan.length, cache.start), dense)
        return out
