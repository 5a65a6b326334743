"""The attention function a patched model runs: Twilight for decode steps, the model's own otherwise.

``twilight.patch`` registers ``"twilight_<impl>"`` in transformers' ``AttentionInterface`` (``<impl>`` is the
model's own implementation, usually ``sdpa``) and points ``config._attn_implementation`` at it. The patched
decoder ``forward`` opens a ``DecoderForward`` record for each call (``ACTIVE_FORWARD``); the function
reads it:

- a single-token query whose K/V are the views a ``TwilightCache`` returned runs ``TwilightPipeline.decode``;
- prefill and multi-token chunks go to ``<impl>`` with the K/V the cache returned, so prefill is exactly the
  model's own attention; their queries are shown to ``TwilightPipeline.observe`` first (``snapkv`` and ``h2o``
  choose tokens from the prompt's attention);
- a decode step under a foreign cache (the forward wrapper has warned) goes to ``<impl>`` as well;
- a decode step that reaches the function outside a patched forward, or whose K/V are not the cache's own,
  raises ``TwilightNotEngagedError``: it would otherwise run dense in silence.
"""
from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass

import torch

from twilight.cache import LayerCache
from twilight.integrations.hf.cache import TwilightCache
from twilight.integrations.hf.compat import CHECKED_RELEASES, attention_function, register_attention
from twilight.pipeline import TwilightPipeline

__all__ = ["TwilightNotEngagedError", "DecoderForward", "ACTIVE_FORWARD", "attention_name", "register"]


class TwilightNotEngagedError(RuntimeError):
    """A decode step of a patched model would run without Twilight, for a reason that is not the user's choice."""


@dataclass
class DecoderForward:
    """One call of a patched decoder's ``forward``: its cache (``None`` when not a ``TwilightCache``)."""

    cache: TwilightCache | None
    served: int = 0  # decode attention calls Twilight ran in this forward
    plan: object = None  # this step's StepPlan, made by the first layer that decodes and shared by the others


class _ActiveForward:
    """The ``DecoderForward`` of the running call: a ``ContextVar`` in eager mode (each thread and task sees its
    own), a plain attribute while ``torch.compile`` traces a step (dynamo cannot trace a ``ContextVar``: a graph
    break). ``set`` returns a token for ``reset``, as ``ContextVar.set`` does."""

    def __init__(self):
        self._var: contextvars.ContextVar[DecoderForward | None] = contextvars.ContextVar("twilight_forward",
                                                                                           default=None)
        self._traced: DecoderForward | None = None

    def get(self) -> DecoderForward | None:
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, value: DecoderForward | None):
        if torch.compiler.is_compiling():
            previous, self._traced = self._traced, value
            return previous
        return self._var.set(value)

    def reset(self, token) -> None:
        if torch.compiler.is_compiling():
            self._traced = token
        else:
            self._var.reset(token)


ACTIVE_FORWARD = _ActiveForward()


def attention_name(delegate: str) -> str:
    return f"twilight_{delegate}"


def _make_attention_function(delegate: str):
    def twilight_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, T, D]; key/value [B, Hkv, L, D] as the cache returned them.
        if query.shape[2] == 1 and key.shape[2] > 1:  # a decode step
            forward = ACTIVE_FORWARD.get()
            if forward is None:
                raise TwilightNotEngagedError(
                    f"a decode step of layer {module.layer_idx} reached Twilight's attention function outside the "
                    "patched decoder forward: this transformers release calls the model in a way twilight.patch "
                    f"does not recognise (checked releases: {', '.join(CHECKED_RELEASES)})")
            if forward.cache is not None:
                layer_cache = forward.cache.layer_cache(module.layer_idx)
                # identity with the view the cache's update returned (data_ptr() is not traceable)
                if layer_cache is None or key is not forward.cache.returned_keys(module.layer_idx):
                    raise TwilightNotEngagedError(
                        f"layer {module.layer_idx} attends to K/V that are not its TwilightCache's own (the cache "
                        "was not updated through TwilightCache.update): Twilight cannot decode this step")
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                out = _decode(forward, module.layer_idx, query[:, :, 0], layer_cache, scale,
                              kwargs.get("sliding_window"))
                forward.served += 1
                return out.unsqueeze(1), None  # [B, 1, Hq, D], as attention functions return
        elif query.shape[2] > 1:  # prefill, or a chunk of it: selectors that watch the prompt see its queries
            forward = ACTIVE_FORWARD.get()
            if forward is not None and forward.cache is not None:
                layer_cache = forward.cache.layer_cache(module.layer_idx)
                if layer_cache is not None and key is forward.cache.returned_keys(module.layer_idx):
                    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                    forward.cache.observe(module.layer_idx, query, scale)
        return attention_function(delegate, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                    dropout=dropout, **kwargs)

    twilight_attention.__name__ = f"twilight_attention_{delegate}"
    return twilight_attention


def _decode(forward: DecoderForward, layer_idx: int, q: torch.Tensor, cache: LayerCache, scale: float,
            sliding_window: int | None) -> torch.Tensor:
    """``pipeline.decode`` on ``q [B, Hq, D]``; a model's sliding window narrows each sequence's valid range.

    Every layer of a step holds the same positions, so the step's plan is made once, by the first layer that
    decodes, and reused by the others."""
    pipeline: TwilightPipeline = forward.cache.pipeline
    plan = forward.plan
    if plan is None or plan.length != cache.length:
        plan = forward.plan = pipeline.plan(cache, scale=scale)
    if sliding_window is None or cache.length <= sliding_window:
        return pipeline.decode(layer_idx, q, cache, scale, plan)
    # The model attends only to the last `sliding_window` positions: [length - window, length). Moving `start`
    # (and its host copies) for this call keeps the selectors, attention and stats inside the window; Quest's page
    # bounds, computed over a wider range, still bound every key in it.
    saved = cache.start, cache.min_start, cache.max_start
    first = cache.length - sliding_window
    cache.start = saved[0].clamp_min(first)
    cache.min_start, cache.max_start = max(saved[1], first), max(saved[2], first)
    try:
        # the step's `shared` dict: tidal hands its selection over across windowed and full layers alike
        windowed = dataclasses.replace(pipeline.plan(cache, scale=scale), shared=plan.shared)
        return pipeline.decode(layer_idx, q, cache, scale, windowed)
    finally:
        cache.start, cache.min_start, cache.max_start = saved


def register(delegate: str) -> str:
    """Register ``twilight_<delegate>`` (attention and mask function); returns the name."""
    name = attention_name(delegate)
    register_attention(name, _make_attention_function(delegate), mask_like=delegate)
    return name
