"""`TwilightPipeline`: the one place that chains Select → Estimate → Prune → Attend.

One pipeline serves every layer of a model. ``new_cache`` builds a layer's ``LayerCache`` with what the
config's selector and estimator need; ``decode`` runs one decode step of one layer and records the
budget in ``stats``. Layers in ``config.dense_layers`` (and every layer under a dense config) attend to
all tokens.

Example::

    >>> pipe = TwilightPipeline("quest-twilight", num_layers=4, num_q_heads=8, num_kv_heads=2)
    >>> cache = pipe.new_cache(layer_idx=2, batch=1, num_kv_heads=2, head_dim=64)
    >>> cache.append(torch.randn(1, 2, 500, 64), torch.randn(1, 2, 500, 64))
    >>> pipe.decode(2, torch.randn(1, 8, 64), cache, scale=0.125).shape
    torch.Size([1, 8, 64])
"""
from __future__ import annotations

import torch

from twilight.backends import resolve_backend
from twilight.cache import LayerCache
from twilight.config import TwilightConfig
from twilight.prune import prune_mask
from twilight.select import compact, make_selector, selector_channels
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
        self.stats = BudgetStats(num_layers, num_q_heads, num_kv_heads)
        self._selectors: dict[int, object] = {}
        self._backends: dict[torch.device, object] = {}
        self._dense_layers = set(self.config.dense_layers)

    # ------------------------------------------------------------------ setup
    def is_dense(self, layer_idx: int) -> bool:
        return self.config.is_dense or layer_idx in self._dense_layers

    def backend(self, device: torch.device):
        """The config's backend on ``device`` (resolved once per device; an unavailable one raises)."""
        device = torch.device(device)
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.config.backend, device)
        return self._backends[device]

    def new_cache(self, layer_idx: int, batch: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  start: torch.Tensor | None = None) -> LayerCache:
        """A ``LayerCache`` holding what this layer's stages read (nothing extra for dense layers)."""
        self.backend(device)  # fail early on an unavailable backend
        dense = self.is_dense(layer_idx)
        sel = self.config.selector
        return LayerCache(batch, num_kv_heads, head_dim, dtype=dtype, device=device, page_size=sel.page_size,
                          quant_bits=None if dense else self.config.estimator.bits,
                          keep_page_bounds=not dense and sel.type == "quest",
                          label_channels=None if dense else selector_channels(sel, layer_idx, num_kv_heads),
                          label_bits=None if dense else sel.label_bits, start=start)

    def _selector(self, layer_idx: int):
        if layer_idx not in self._selectors:
            self._selectors[layer_idx] = make_selector(self.config.selector, layer_idx)
        return self._selectors[layer_idx]

    # ------------------------------------------------------------------ one step
    def select(self, layer_idx: int, q: torch.Tensor, cache: LayerCache) -> Selection:
        """Stage 1: the candidate ``Selection``."""
        if self.is_dense(layer_idx):
            return Selection.full(cache.batch, cache.num_kv_heads, cache.length, device=q.device, start=cache.start)
        sel_cfg = self.config.selector
        backend = self.backend(q.device)
        if sel_cfg.type == "quest" and hasattr(backend, "quest_select"):  # a fused kernel (GPU backends)
            return backend.quest_select(q, cache, sel_cfg.token_budget, sel_cfg.page_size)
        return self._selector(layer_idx)(q, cache)

    def prune(self, q: torch.Tensor, cache: LayerCache, sel: Selection, scale: float) -> tuple[Selection, torch.Tensor]:
        """Stages 2 and 3: estimate the candidates' scores, prune per query head, union per kv-head.

        Returns the pruned selection and the kept-token count of every query head ``[B, Hq]``.
        """
        backend = self.backend(q.device)
        cfg = self.config
        if cfg.pruner.type == "top_p" and hasattr(backend, "prune_to_selection"):
            # Fused GPU kernels: top-p on the raw scores (scaled inside), GQA union and compaction in one go.
            scores = backend.estimate(q, cache, sel, cfg.estimator.type)  # [B, Hq, K]
            return backend.prune_to_selection(scores, sel, cfg.pruner.p, scale=scale)
        logits = backend.estimate(q, cache, sel, cfg.estimator.type) * scale  # [B, Hq, K]
        if cfg.pruner.type == "top_p":
            keep = backend.prune_top_p(logits, cfg.pruner.p)
        else:
            keep = prune_mask(logits, cfg.pruner)
        B, Hq, K = keep.shape
        keep_kv = keep.view(B, cache.num_kv_heads, Hq // cache.num_kv_heads, K).any(2)  # union over the group
        indices, counts = compact(sel.indices, keep_kv)
        return Selection(indices, counts), keep.sum(-1, dtype=torch.int32)

    def decode(self, layer_idx: int, q: torch.Tensor, cache: LayerCache, scale: float) -> torch.Tensor:
        """One decode step of one layer: ``q [B, Hq, D]`` -> attention output ``[B, Hq, D]``."""
        if q.dim() != 3 or q.shape[1] != self.num_q_heads:
            raise ValueError(f"q must be [B, Hq={self.num_q_heads}, D], got {tuple(q.shape)}")
        backend = self.backend(q.device)
        sel = self.select(layer_idx, q, cache)
        dense = self.is_dense(layer_idx)
        if dense or self.config.pruner.type == "none":
            q_counts = sel.counts.repeat_interleave(self.num_q_heads // cache.num_kv_heads, dim=1)
        else:
            sel, q_counts = self.prune(q, cache, sel, scale)
        out = backend.attend(q, cache, sel, scale)
        self.stats.record(layer_idx, q_counts, sel.counts, cache.lengths(), dense)
        return out
