"""``TwilightCache``: a transformers ``Cache`` whose layers keep Twilight's ``LayerCache``.

Each ``TwilightLayer`` wraps a ``twilight.LayerCache`` built lazily on its first ``update`` by the pipeline's
``new_cache``: exact K/V plus the quantized K and Quest page bounds, kept in sync on every append (no
per-step ``torch.cat``). Left padding read from the attention mask at prefill becomes each sequence's
``LayerCache.start``, so padding is never selected.
"""
from __future__ import annotations

import torch

from twilight.cache import LayerCache
from twilight.integrations.hf.compat import Cache, CacheLayerMixin
from twilight.pipeline import TwilightPipeline

__all__ = ["TwilightCache", "TwilightLayer"]


class TwilightLayer(CacheLayerMixin):
    """One layer of a ``TwilightCache``: a ``LayerCache`` created on the first ``update``.

    ``update`` appends ``[B, Hkv, T, D]`` keys/values and returns ``[B, Hkv, length, D]`` views of the whole
    exact K/V (no copy). ``keys``/``values`` are the same views, for code that reads them.
    """

    is_sliding = False  # keeps every token; a model's sliding window is applied by the attention function
    is_croppable = False

    def __init__(self, pipeline: TwilightPipeline, layer_idx: int, max_cache_len: int | None = None,
                 device: torch.device | str | None = None):
        # CacheLayerMixin.__init__ would assign keys/values, which are read-only views here.
        # (not ``max_cache_len``: transformers 5.0's Cache reads that of its layers, as a number)
        self.pipeline, self.layer_idx, self.final_length = pipeline, layer_idx, max_cache_len
        self.planned_device = None if device is None else torch.device(device)
        self.returned: torch.Tensor | None = None  # the keys view the latest update returned
        self.cache: LayerCache | None = None
        self.start: torch.Tensor | None = None  # [B] left-padding counts, applied when the cache is built
        self.is_initialized = False

    def __repr__(self):
        return f"TwilightLayer(layer={self.layer_idx}, length={self.get_seq_length()})"

    @property
    def is_compileable(self) -> bool:
        """True when the buffers are allocated once (the final length is known) on a device where the pipeline's
        decode step compiles (``TwilightPipeline.compileable``): ``generate()`` then compiles the decode step."""
        device = self.device if self.is_initialized else self.planned_device
        return self.final_length is not None and device is not None and self.pipeline.compileable(device)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.cache is None else self.cache.keys()

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.cache is None else self.cache.values()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.cache = self.pipeline.new_cache(self.layer_idx, B, H, D, dtype=key_states.dtype,
                                             device=key_states.device, start=self.start,
                                             capacity=self.final_length or 0)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.cache is None:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        # The attention function checks that it attends to this very view (identity: data_ptr() is not traceable).
        self.returned = self.cache.keys()
        return self.returned, self.cache.values()

    def set_start(self, start: torch.Tensor | None) -> None:
        self.start = start
        if self.cache is not None:
            self.cache.set_start(torch.zeros(self.cache.batch, dtype=torch.int32) if start is None else start)

    def get_seq_length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers < 5.x passed ``cache_position`` (a tensor of the query's positions) instead of a length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:  # no maximum: the cache grows
        return -1

    get_max_cache_shape = get_max_length  # transformers 5.0's name for it

    def reset(self) -> None:
        self.cache = self.returned = None
        self.is_initialized = False

    def _select(self, index: torch.Tensor) -> None:
        if self.start is not None:
            self.start = self.start.index_select(0, index.to(self.start.device, torch.long))
        if self.cache is not None:
            self.cache.select_batch(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cache is not None:
            self._select(torch.arange(self.cache.batch, device=self.cache.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a TwilightCache cannot be cropped (assisted/speculative decoding is not "
                                      "supported with twilight.patch)")

    def offload(self):
        raise NotImplementedError("a TwilightCache cannot be offloaded")

    prefetch = offload


class TwilightCache(Cache):
    """A transformers ``Cache`` whose layers keep Twilight's ``LayerCache`` (exact K/V + selector extras).

    Built by ``make_cache(model)`` (or automatically by a patched model); ``pipeline`` is the one of the
    config the model was patched with at that time, and it keeps that config for its whole life.
    ``max_cache_len``: the most positions it will hold, when known (``generate()`` knows it): each layer's buffers
    are then allocated once, at that length; without it they grow by a quarter when full. ``device``: where the
    model runs, when known before the first update. A cache with both is compileable (``is_compileable``) where
    the pipeline's backend compiles its decode step: ``generate()`` with a ``CompileConfig`` (on a CPU, one
    that compiles on every device) then compiles the decode step, as it does for transformers' static cache.
    ``observers``: pipelines of other configs whose selectors also watch this cache's prefill (``observe``), so
    that it can be forked into those configs (``make_cache(..., observe_for=)``).
    """

    def __init__(self, pipeline: TwilightPipeline, num_layers: int, max_cache_len: int | None = None,
                 device: torch.device | str | None = None, observers: tuple[TwilightPipeline, ...] = ()):
        super().__init__(layers=[TwilightLayer(pipeline, i, max_cache_len, device) for i in range(num_layers)])
        # the length asked for (``max_cache_len`` is a read-only property of transformers 5.0's Cache)
        self.pipeline, self.final_length = pipeline, max_cache_len
        self.observers = tuple(observers)
        self.start: torch.Tensor | None = None  # [B] int32 left padding, None = no padding
        self._start_list: list[int] | None = None
        self.padding_error: str | None = None  # set when the mask is not left padding: decoding then refuses

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def prepare_decode(self) -> None:
        """Bring every sparse layer's derived structures (int4 keys, page bounds) up to date after a prefill (the
        patched forward calls it), so that each decode step derives exactly its one new token: the step then has
        one shape whatever the prompt, and a compiled step one graph for all steps. A context below the dense
        crossover is derived here too when the cache is compileable (its compiled steps then derive their token
        even while they attend densely), so that crossing the crossover derives one token, not the whole context
        inside a traced step."""
        compileable = self.is_compileable
        for i, layer in enumerate(self.layers):
            c = layer.cache
            if c is not None and not self.pipeline.is_dense(i) and (
                    compileable or c.length - c.min_start >= self.pipeline.config.crossover(c.device)):
                c.update_derived()

    def observe(self, layer_idx: int, q: torch.Tensor, scale: float) -> None:
        """Show the prompt's queries ``q [B, Hq, T, D]`` of layer ``layer_idx`` (whose K/V this cache holds as its
        last ``T`` tokens) to the selectors of the cache's config and of its ``observers``."""
        layer_cache = self.layer_cache(layer_idx)
        for pipeline in (self.pipeline, *self.observers):
            pipeline.observe(layer_idx, q, layer_cache, scale)

    def returned_keys(self, layer_idx: int) -> torch.Tensor | None:
        """The keys view ``update`` last returned for ``layer_idx`` (what a decode step must attend to)."""
        return self.layers[layer_idx].returned

    def layer_cache(self, layer_idx: int) -> LayerCache | None:
        """The ``LayerCache`` of ``layer_idx`` (``None`` before its first update)."""
        return self.layers[layer_idx].cache

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Read each sequence's left padding from a 2-D ``attention_mask [B, seen + new]`` (1 = token)."""
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return  # (generate() with a compileable cache hands the model 4-D masks: it read the 2-D one before)
        mask = attention_mask != 0
        S = mask.shape[1]
        has_token = mask.any(1)
        start = torch.where(has_token, mask.to(torch.int8).argmax(1), S)  # leading pad count per sequence
        tokens = mask.sum(1)
        if bool((tokens != S - start).any()):
            self.padding_error = ("the attention mask has padding after a sequence's first token (right padding or "
                                  "holes); Twilight decodes left-padded batches only: use "
                                  "tokenizer.padding_side='left'")
            return
        self.padding_error = None
        start_list = start.tolist()
        if start_list == (self._start_list or [0] * len(start_list)):
            return
        self._start_list = start_list
        self.start = start.to(torch.int32)
        for layer in self.layers:
            layer.set_start(self.start)
