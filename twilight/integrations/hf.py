"""One-line patching of Hugging Face causal LMs: prefill dense, every decode step through Twilight.

::

    import twilight
    twilight.patch(model, "quest-twilight")        # preset name, JSON path, dict or TwilightConfig
    out = model.generate(**inputs, max_new_tokens=32)
    print(twilight.budget_stats(model).summary())
    twilight.unpatch(model)                        # the model is exactly as before

How it hooks in (transformers 5.x, families ``SUPPORTED_MODEL_TYPES``):

- **Attention registry.** ``patch`` registers an attention function ``"twilight_<impl>"`` in
  ``AttentionInterface`` (``<impl>`` is the model's own implementation, usually ``sdpa``), registers
  ``<impl>``'s mask function under the same name in ``AttentionMaskInterface``, and points
  ``config._attn_implementation`` at it. For a single-token query whose K/V come from a ``TwilightCache`` it
  runs ``TwilightPipeline.decode``; everything else (prefill, multi-token chunks, foreign caches) goes to
  ``<impl>`` with the K/V the cache returned, so prefill is exactly the model's own attention.
- **Custom cache.** ``TwilightCache`` (a transformers ``Cache``) holds one ``TwilightLayer`` per layer, each
  wrapping a ``twilight.LayerCache`` built lazily on its first ``update`` by ``pipeline.new_cache``: exact K/V
  plus the quantized K and Quest page bounds, kept in sync on every append (no per-step ``torch.cat``).
- **Two instance-level method wrappers**, removed by ``unpatch``: the decoder's ``forward`` (creates a
  ``TwilightCache`` when ``use_cache`` and no cache is passed, reads each sequence's left padding from the
  2-D attention mask at prefill, and marks the cache active for the attention function) and the model's
  ``_prepare_cache_for_generation`` (``generate()`` gets a ``TwilightCache`` instead of a ``DynamicCache``).

Left padding: each sequence's count of leading pad tokens becomes its ``LayerCache.start``, so padding is
never selected; decode steps then ignore the attention mask. Only left padding is supported for decoding.

Not supported (each refused with a message): static/offloaded/quantized caches, cropping the cache
(assisted decoding), right padding at decode time. A forward with ``use_cache=True`` (the config default)
builds a ``TwilightCache`` even when no decoding follows; pass ``use_cache=False`` for scoring-only passes.
Unpatch before ``copy.deepcopy(model)``: the copied method wrappers would still point at the original.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from twilight.cache import LayerCache
from twilight.config import TwilightConfig
from twilight.pipeline import TwilightPipeline
from twilight.stats import BudgetStats

__all__ = ["patch", "unpatch", "budget_stats", "is_patched", "make_cache", "TwilightCache", "TwilightLayer",
           "SUPPORTED_MODEL_TYPES", "SUPPORTED_TRANSFORMERS", "check_transformers_version"]

#: ``config.model_type`` of the model families the integration is tested on.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Supported transformers releases (a PEP 440 specifier), the same as setup.py's ``install_requires``.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
#: Attention implementations a patched model may delegate prefill to.
_DELEGATES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_ATTR = "_twilight"  # the patch state, on the patched model

# The TwilightCache the running forward pass uses (set by the decoder wrapper, read by the attention function).
_ACTIVE_CACHE: contextvars.ContextVar["TwilightCache | None"] = contextvars.ContextVar("twilight_cache", default=None)


# ---------------------------------------------------------------------------------------------------- the cache
def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


try:  # transformers is a hard dependency of this module; the version check in `patch` says what is wrong
    _Cache, _CacheLayerMixin = _cache_classes()
except ImportError as e:  # pragma: no cover - transformers < 4.56 has no CacheLayerMixin
    raise ImportError(f"twilight.integrations.hf needs transformers{SUPPORTED_TRANSFORMERS}: {e}") from e


class TwilightLayer(_CacheLayerMixin):
    """One layer of a ``TwilightCache``: a ``LayerCache`` created on the first ``update``.

    ``update`` appends ``[B, Hkv, T, D]`` keys/values and returns ``[B, Hkv, length, D]`` views of the whole
    exact K/V (no copy). ``keys``/``values`` are the same views, for code that reads them.
    """

    is_sliding = False  # keeps every token; a model's sliding window is applied by the attention function
    is_compileable = False
    is_croppable = False

    def __init__(self, pipeline: TwilightPipeline, layer_idx: int):
        # CacheLayerMixin.__init__ would assign keys/values, which are read-only views here.
        self.pipeline, self.layer_idx = pipeline, layer_idx
        self.cache: LayerCache | None = None
        self.start: torch.Tensor | None = None  # [B] left-padding counts, applied when the cache is built
        self.is_initialized = False

    def __repr__(self):
        return f"TwilightLayer(layer={self.layer_idx}, length={self.get_seq_length()})"

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.cache is None else self.cache.keys()

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.cache is None else self.cache.values()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.cache = self.pipeline.new_cache(self.layer_idx, B, H, D, dtype=key_states.dtype,
                                             device=key_states.device, start=self.start)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.cache is None:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        return self.cache.keys(), self.cache.values()

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

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache = None
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


class TwilightCache(_Cache):
    """A transformers ``Cache`` whose layers keep Twilight's ``LayerCache`` (exact K/V + selector extras).

    Built by ``make_cache(model)`` (or automatically by a patched model); ``pipeline`` is the one of the
    config the model was patched with at that time, and it keeps that config for its whole life.
    """

    def __init__(self, pipeline: TwilightPipeline, num_layers: int):
        super().__init__(layers=[TwilightLayer(pipeline, i) for i in range(num_layers)])
        self.pipeline = pipeline
        self.start: torch.Tensor | None = None  # [B] int32 left padding, None = no padding
        self._start_list: list[int] | None = None
        self.padding_error: str | None = None  # set when the mask is not left padding: decoding then refuses

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def layer_cache(self, layer_idx: int) -> LayerCache | None:
        """The ``LayerCache`` of ``layer_idx`` (``None`` before its first update)."""
        return self.layers[layer_idx].cache

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Read each sequence's left padding from a 2-D ``attention_mask [B, seen + new]`` (1 = token)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return
        mask = attention_mask != 0
        S = mask.shape[1]
        has_token = mask.any(1)
        start = torch.where(has_token, mask.to(torch.int8).argmax(1), S)  # leading pad count per sequence
        tokens = mask.sum(1)
        if bool((tokens != S - start).any()):
            self.padding_error = ("the attention mask has padding after a sequence's first token (right padding or "
                                  "holes); Twilight decodes left-padded batches only: use tokenizer.padding_side='left'")
            return
        self.padding_error = None
        start_list = start.tolist()
        if start_list == (self._start_list or [0] * len(start_list)):
            return
        self._start_list = start_list
        self.start = start.to(torch.int32)
        for layer in self.layers:
            layer.set_start(self.start)


def make_cache(model) -> TwilightCache:
    """A fresh, empty ``TwilightCache`` for a patched ``model`` (to pass as ``past_key_values``)."""
    state = _state(model)
    return TwilightCache(state.pipeline, state.num_layers)


# ---------------------------------------------------------------------------------------------------- attention
_EAGER_BY_CLASS: dict[type, Any] = {}


def _delegate_function(name: str, module: torch.nn.Module):
    """The model's own attention function ``name`` (``eager`` is defined per modeling file)."""
    if name == "eager":
        fn = _EAGER_BY_CLASS.get(type(module))
        if fn is None:
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to delegate prefill to")
            _EAGER_BY_CLASS[type(module)] = fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _attention_name(delegate: str) -> str:
    return f"twilight_{delegate}"


def _make_attention_function(delegate: str):
    """The registered ``twilight_<delegate>`` attention function."""

    def twilight_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, Hq, T, D]; key/value [B, Hkv, L, D] as the cache returned them.
        cache = _ACTIVE_CACHE.get()
        if cache is not None and query.shape[2] == 1:
            layer_cache = cache.layer_cache(module.layer_idx)
            if layer_cache is not None and key.data_ptr() == layer_cache.k.data_ptr():
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                out = _decode(cache.pipeline, module.layer_idx, query[:, :, 0], layer_cache, scale,
                              kwargs.get("sliding_window"))
                return out.unsqueeze(1), None  # [B, 1, Hq, D], as attention functions return
        return _delegate_function(delegate, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                    dropout=dropout, **kwargs)

    twilight_attention.__name__ = f"twilight_attention_{delegate}"
    return twilight_attention


def _decode(pipeline: TwilightPipeline, layer_idx: int, q: torch.Tensor, cache: LayerCache, scale: float,
            sliding_window: int | None) -> torch.Tensor:
    """``pipeline.decode`` on ``q [B, Hq, D]``; a model's sliding window narrows each sequence's valid range."""
    if sliding_window is None or cache.length <= sliding_window:
        return pipeline.decode(layer_idx, q, cache, scale)
    # The model attends only to the last `sliding_window` positions: [length - window, length). Moving `start`
    # for this call keeps the selectors, attention and stats inside the window; Quest's page bounds, computed
    # over a wider range, still bound every key in it.
    padding_start = cache.start
    cache.start = padding_start.clamp_min(cache.length - sliding_window)
    try:
        return pipeline.decode(layer_idx, q, cache, scale)
    finally:
        cache.start = padding_start


def _register_attention(delegate: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _attention_name(delegate)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention_function(delegate))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[delegate])
    return name


# ---------------------------------------------------------------------------------------------------- patching
_MISSING = object()


@dataclass
class _PatchState:
    pipeline: TwilightPipeline
    num_layers: int
    attn_name: str
    delegate: str
    configs: list = field(default_factory=list)  # [(config, original _attn_implementation_internal)]
    methods: list = field(default_factory=list)  # [(object, attribute, previous instance value or _MISSING)]
    warned: set = field(default_factory=set)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless the installed (or given) transformers release is supported."""
    from packaging.specifiers import SpecifierSet

    if version is None:
        import transformers

        version = transformers.__version__
    if not SpecifierSet(SUPPORTED_TRANSFORMERS).contains(version, prereleases=True):
        raise RuntimeError(f"twilight.patch supports transformers{SUPPORTED_TRANSFORMERS} (the range declared in "
                           f"setup.py); transformers {version} is installed")


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _check_supported(model) -> None:
    check_transformers_version()
    from transformers import PreTrainedModel

    families = ", ".join(SUPPORTED_MODEL_TYPES)
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"twilight.patch needs a Hugging Face PreTrainedModel (families: {families}), "
                         f"got {type(model).__name__}")
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"twilight.patch does not support {type(model).__name__} (model_type={model_type!r}); "
                         f"supported model families: {families}")


def _decoder_and_attention(model):
    """The decoder module (with ``.layers``) and its attention modules, in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers to patch")
    attention = [getattr(layer, "self_attn", None) for layer in layers]
    if any(a is None or not hasattr(a, "layer_idx") for a in attention):
        raise ValueError(f"{type(model).__name__}: every decoder layer needs a self_attn module with a layer_idx")
    if [a.layer_idx for a in attention] != list(range(len(attention))):
        raise ValueError(f"{type(model).__name__}: attention layer_idx values are not 0..{len(attention) - 1}")
    return decoder, attention


def _geometry(model, num_layers: int) -> tuple[int, int]:
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    if getattr(cfg, "num_hidden_layers", num_layers) != num_layers:
        raise ValueError(f"config.num_hidden_layers={cfg.num_hidden_layers} but the model has {num_layers} layers")
    return hq, hkv


def _set_instance_attr(state: _PatchState, obj, name: str, value) -> None:
    state.methods.append((obj, name, obj.__dict__.get(name, _MISSING)))
    setattr(obj, name, value)


def _bind_kwargs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Positional + keyword arguments of a call -> one keyword dict (a ``**kwargs`` parameter flattened)."""
    bound = signature.bind_partial(*args, **kwargs)
    out: dict = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _wrap_decoder_forward(model, state: _PatchState, decoder) -> None:
    original = decoder.forward  # bound method, or an instance attribute someone else set (e.g. accelerate hooks)
    signature = inspect.signature(original)
    has_var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args and not has_var_positional:
            kwargs = _bind_kwargs(signature, args, kwargs)
            args = ()
        cache = kwargs.get("past_key_values")
        if cache is None and not args:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(decoder.config, "use_cache", False)
            if use_cache and not (decoder.training and getattr(decoder, "gradient_checkpointing", False)):
                st = getattr(model, _ATTR, state)
                cache = kwargs["past_key_values"] = TwilightCache(st.pipeline, st.num_layers)
        if not isinstance(cache, TwilightCache):
            if cache is not None:
                state.warn_once("foreign", f"past_key_values is a {type(cache).__name__}, not a Twilight cache: "
                                "decode steps run dense. Pass twilight.integrations.hf.make_cache(model), or none.")
            return original(*args, **kwargs)
        if model.config._attn_implementation != state.attn_name:
            state.warn_once("impl", f"config._attn_implementation was changed to "
                            f"{model.config._attn_implementation!r} after twilight.patch: decode steps run dense; "
                            "call twilight.patch(model, ...) again to re-enable Twilight")
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        new = tokens.shape[1] if tokens is not None else 0
        if new > 1 or cache.get_seq_length() == 0:  # prefill (or a chunk of it): read the left padding
            cache.set_padding(kwargs.get("attention_mask"))
        elif cache.padding_error is not None:
            raise ValueError(cache.padding_error)
        token = _ACTIVE_CACHE.set(cache)
        try:
            return original(**kwargs)
        finally:
            _ACTIVE_CACHE.reset(token)

    _set_instance_attr(state, decoder, "forward", forward)


def _wrap_prepare_cache(model, state: _PatchState) -> None:
    original = getattr(model, "_prepare_cache_for_generation", None)
    if original is None:  # a bare decoder (no generate): the forward wrapper is enough
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def prepare_cache_for_generation(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs).arguments
        model_kwargs, generation_config = bound.get("model_kwargs"), bound.get("generation_config")
        if model_kwargs is None:
            return result
        cache = model_kwargs.get("past_key_values")
        if cache is None or isinstance(cache, TwilightCache):
            return result
        from transformers.cache_utils import DynamicCache

        if getattr(cache, "_is_user_defined", False):
            return result  # the forward wrapper warns that decoding runs dense with it
        if type(cache) is DynamicCache and not getattr(cache, "offloading", False):
            st = getattr(model, _ATTR, state)
            model_kwargs["past_key_values"] = TwilightCache(st.pipeline, st.num_layers)
            return result
        impl = getattr(generation_config, "cache_implementation", None)
        raise ValueError(f"twilight.patch manages its own dynamic cache; generate(cache_implementation={impl!r}) "
                         f"created a {type(cache).__name__}, which Twilight cannot decode with. Leave "
                         "cache_implementation unset (or 'dynamic').")

    _set_instance_attr(state, model, "_prepare_cache_for_generation", prepare_cache_for_generation)


def _attention_configs(model, attention) -> list:
    """Every distinct config object the model's attention modules read ``_attn_implementation`` from."""
    configs = [model.config]
    for module in attention:
        cfg = getattr(module, "config", None)
        if cfg is not None and all(cfg is not c for c in configs):
            configs.append(cfg)
    return configs


def patch(model, spec: Any = "quest-twilight"):
    """Run every decode step of ``model`` through the Twilight pipeline (prefill stays dense).

    Args:
        model: a Hugging Face causal LM of a supported family (``SUPPORTED_MODEL_TYPES``), on any device and
            dtype. Its attention implementation (``sdpa``, ``eager``, flash…) keeps serving prefill.
        spec: preset name (``twilight.PRESETS``), JSON path, dict or ``TwilightConfig``; copied, so later
            changes to the object do not reach the model.
    Returns:
        ``model`` (patched in place). Patching an already-patched model replaces its config and starts new
        ``budget_stats``; caches created before keep the config they were built with.
    Raises:
        ValueError: unsupported model family, or a config that does not fit the model.
        RuntimeError: unsupported transformers version.

    Example::

        >>> twilight.patch(model, "quest-twilight")
        >>> out = model.generate(**tok("...", return_tensors="pt"), max_new_tokens=16)
        >>> twilight.budget_stats(model).as_dict()["attended_fraction"]
    """
    _check_supported(model)
    config = TwilightConfig.load(spec)
    decoder, attention = _decoder_and_attention(model)
    num_layers = len(attention)
    hq, hkv = _geometry(model, num_layers)
    pipeline = TwilightPipeline(config, num_layers=num_layers, num_q_heads=hq, num_kv_heads=hkv)

    state: _PatchState | None = model.__dict__.get(_ATTR)
    if state is not None:
        current = model.config._attn_implementation
        if current == state.attn_name:  # re-patch: a new config, new stats; wrappers and registry stay
            state.pipeline = pipeline
            state.warned.clear()
            return model
        # The attention implementation was changed since (e.g. set_attn_implementation): start over from it,
        # so that unpatch later restores the user's latest choice.
        _restore(model.__dict__.pop(_ATTR), configs=False)

    delegate = model.config._attn_implementation or "eager"
    if delegate not in _DELEGATES:
        raise ValueError(f"twilight.patch cannot run on attn_implementation={delegate!r}; supported: "
                         f"{', '.join(_DELEGATES)}")
    attn_name = _register_attention(delegate)
    state = _PatchState(pipeline=pipeline, num_layers=num_layers, attn_name=attn_name, delegate=delegate)
    try:
        for cfg in _attention_configs(model, attention):
            state.configs.append((cfg, cfg.__dict__.get("_attn_implementation_internal", _MISSING)))
            cfg._attn_implementation_internal = attn_name
        _wrap_decoder_forward(model, state, decoder)
        _wrap_prepare_cache(model, state)
        model.__dict__[_ATTR] = state
    except Exception:
        _restore(state)
        raise
    return model


def _restore(state: _PatchState, configs: bool = True) -> None:
    for obj, name, previous in reversed(state.methods):
        if previous is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = previous
    for cfg, previous in reversed(state.configs if configs else []):
        if previous is _MISSING:
            cfg.__dict__.pop("_attn_implementation_internal", None)
        else:
            cfg._attn_implementation_internal = previous
    state.methods.clear()
    state.configs.clear()


def unpatch(model):
    """Undo ``patch``: original attention implementation, methods and attributes. Returns ``model``.

    Raises ``ValueError`` if the model is not patched.
    """
    state = model.__dict__.pop(_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by twilight.patch")
    _restore(state)
    return model


def is_patched(model) -> bool:
    return _ATTR in getattr(model, "__dict__", {})


def _state(model) -> _PatchState:
    state = getattr(model, "__dict__", {}).get(_ATTR)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched: call twilight.patch(model, ...) first")
    return state


def budget_stats(model) -> BudgetStats:
    """The live ``BudgetStats`` of a patched model (``as_dict()``, ``summary()``, ``plot(path)``, ``reset()``)."""
    return _state(model).pipeline.stats
