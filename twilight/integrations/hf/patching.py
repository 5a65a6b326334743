"""``patch`` / ``unpatch`` / ``budget_stats``: one line that runs every decode step through Twilight.

How it hooks in (families ``SUPPORTED_MODEL_TYPES``):

- the attention implementation: ``config._attn_implementation`` points at ``twilight_<impl>``, registered by
  ``twilight.integrations.hf.attention``;
- two instance-level method wrappers, removed by ``unpatch``: the decoder's ``forward`` (creates a
  ``TwilightCache`` when ``use_cache`` and no cache is passed, under whichever name the transformers release
  uses, reads each sequence's left padding from the 2-D attention mask at prefill, and opens the record the
  attention function reads) and the model's ``_prepare_cache_for_generation`` (``generate()`` gets a
  ``TwilightCache`` instead of a ``DynamicCache``); plus ``generate`` itself, to check after each call that
  its decode steps went through Twilight.

Never dense in silence. A decode step that does not go through Twilight either raises
(``TwilightNotEngagedError``: an unknown calling convention, K/V that are not the cache's own;
``ValueError``: a static, offloaded or quantized cache built by ``generate(cache_implementation=...)``), or,
where running dense is the user's own choice (a foreign cache passed in, ``_attn_implementation`` changed
after patching), warns once naming the cause. A ``generate()`` call that decoded tokens while no decode step
went through Twilight warns with the cause.

Not supported (each refused with a message): cropping the cache (assisted decoding), right padding at decode
time. A forward with ``use_cache=True`` (the config default) builds a ``TwilightCache`` even when no decoding
follows; pass ``use_cache=False`` for scoring-only passes.

Copies. ``copy.deepcopy(model)`` and pickling the whole model (``torch.save(model)`` / ``torch.load(...,
weights_only=False)``) give a model patched on its own: it runs its own weights, with its own pipeline (same
config), stats and ``engagement`` counters (copies of the original's at the time of copying), and
``unpatch`` on either model leaves the other patched. The wrappers are objects, not closures, for that.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from twilight.config import TwilightConfig
from twilight.integrations.hf import compat
from twilight.integrations.hf.attention import ACTIVE_FORWARD, DecoderForward, register
from twilight.integrations.hf.cache import TwilightCache
from twilight.integrations.hf.distributed import gather_stats, local_head_counts
from twilight.pipeline import TwilightPipeline
from twilight.select import observation_key
from twilight.stats import BudgetStats

__all__ = ["patch", "unpatch", "budget_stats", "engagement", "bypassed_steps", "is_patched", "make_cache", "fork_cache",
           "check_supported", "SUPPORTED_MODEL_TYPES"]

#: ``config.model_type`` of the model families the integration is tested on.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Attention implementations a patched model may delegate prefill to.
_DELEGATES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_ATTR = "_twilight"  # the patch state, on the patched model
_MISSING = compat._MISSING  # "not set on the instance", kept through deepcopy and pickle


def _normal_zeros(n: int) -> torch.Tensor:
    """Zeros that are not an inference tensor even when made under ``torch.inference_mode()`` (``patch`` called
    there): the counters are then updated in place in or out of inference mode alike."""
    with torch.inference_mode(False):
        return torch.zeros(n, dtype=torch.int64)


@dataclass
class _PatchState:
    pipeline: TwilightPipeline
    num_layers: int
    attn_name: str
    delegate: str
    cache_name: str  # the keyword the decoder's forward takes the cache under
    configs: list = field(default_factory=list)  # [(config, original _attn_implementation_internal)]
    methods: list = field(default_factory=list)  # [(object, attribute, previous instance value or _MISSING)]
    warned: set = field(default_factory=set)
    # [decode forwards, twilight forwards]: a tensor counted in place, so that a compiled decode step counts too
    # (a Python int reached through the model is a constant to dynamo: one recompilation per step)
    counts: torch.Tensor = field(default_factory=lambda: _normal_zeros(2))
    dense_cause: str | None = None  # why the latest decode forward ran without Twilight

    @property
    def decode_forwards(self) -> int:
        return int(self.counts[0])

    @property
    def twilight_forwards(self) -> int:
        return int(self.counts[1])

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def new_cache(self, max_cache_len: int | None = None, device=None, observe_for=()) -> TwilightCache:
        return TwilightCache(self.pipeline, self.num_layers, max_cache_len=max_cache_len, device=device,
                             observers=self._observers(observe_for))

    def _observers(self, configs) -> tuple[TwilightPipeline, ...]:
        """One pipeline per distinct ``observation_key`` among ``configs`` that the patched config's does not cover
        (configs whose selectors observe nothing need none)."""
        seen, observers = {observation_key(self.pipeline.config), None}, []
        for spec in configs:
            cfg = TwilightConfig.load(spec)
            key = observation_key(cfg)
            if key not in seen:
                seen.add(key)
                observers.append(TwilightPipeline(cfg, self.num_layers, self.pipeline.num_q_heads,
                                                  self.pipeline.num_kv_heads))
        return tuple(observers)

    # copy.deepcopy and pickle of a patched model copy its state through these: the copy gets a pipeline of its own
    # (the same config, a copy of the stats; backends and selectors are rebuilt when it first decodes), its own
    # counters, and configs/methods that name the copy's objects (the copy's memo maps them).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["pipeline"] = _pipeline_spec(self.pipeline)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["pipeline"] = _pipeline_from_spec(state["pipeline"])
        self.__dict__.update(state)
        register(self.delegate)  # a model unpickled in a new process: its attention implementation is registered


def _pipeline_spec(pipeline: TwilightPipeline) -> dict:
    """What a copy of ``pipeline`` is built from: its public attributes (config, shape, settings such as
    ``host_reads``, the stats). The private ones are what it builds lazily from them (backends, selectors), which
    do not copy."""
    return {k: v for k, v in vars(pipeline).items() if not k.startswith("_")}


def _pipeline_from_spec(spec: dict) -> TwilightPipeline:
    pipeline = TwilightPipeline(spec["config"], num_layers=spec["num_layers"], num_q_heads=spec["num_q_heads"],
                                num_kv_heads=spec["num_kv_heads"])
    pipeline.__dict__.update(spec)
    return pipeline


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def check_supported(model) -> None:
    """Raise unless ``model`` is a supported family on a supported transformers release."""
    compat.check_transformers_version()
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


class _Wrapper:
    # What ``patch`` puts in ``owner.__dict__[name]`` in place of a method. Not a closure: the patched model, its
    # patch state, the owner and the instance attribute it replaced are attributes, so ``copy.deepcopy`` (whose
    # memo maps each of them to its copy) and pickle carry the wrapper over to a copy that then calls the copy's
    # own modules and counts into the copy's own state. The method it calls and that method's signature are looked
    # up again after a copy (``_derived``), never copied. (A closure is copied as the same function: a deep copy
    # of the model would run the original's modules, weights included.)

    def __init__(self, model, state: _PatchState, owner, name: str):
        self.model, self.state, self.owner, self.name = model, state, owner, name
        self.previous = owner.__dict__.get(name, _MISSING)  # an instance attribute someone else set (accelerate)
        self._derived: dict = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_derived"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._derived = {}

    @property
    def __wrapped__(self):
        """The method this wrapper calls: the instance attribute it replaced, else the owner's class method."""
        original = self._derived.get("original")
        if original is None:
            original = self.previous
            if original is _MISSING:
                cls = type(self.owner)
                original = getattr(cls, self.name).__get__(self.owner, cls)
            self._derived["original"] = original
        return original

    @property
    def signature(self) -> inspect.Signature:
        signature = self._derived.get("signature")
        if signature is None:
            signature = self._derived["signature"] = inspect.signature(self.__wrapped__)
            self._derived["var_positional"] = any(p.kind is inspect.Parameter.VAR_POSITIONAL
                                                  for p in signature.parameters.values())
        return signature

    def patch_state(self) -> _PatchState:
        return getattr(self.model, _ATTR, self.state)

    def __repr__(self):
        return f"<twilight.patch wrapper of {type(self.owner).__qualname__}.{self.name}>"


class _DecoderForward(_Wrapper):
    """The decoder's ``forward``: creates the ``TwilightCache``, reads left padding, opens the record the
    attention function reads, counts decode forwards."""

    def __call__(self, *args, **kwargs):
        decoder, st = self.owner, self.patch_state()
        original, signature = self.__wrapped__, self.signature
        if args and not self._derived["var_positional"]:
            kwargs = _bind_kwargs(signature, args, kwargs)
            args = ()
        cache_name = st.cache_name
        given_as, cache = compat.find_cache(kwargs)
        if given_as is not None and given_as != cache_name:  # the other spelling: hand it on under ours
            kwargs[cache_name] = kwargs.pop(given_as)
        if cache is None and not args:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(decoder.config, "use_cache", False)
            if use_cache and not (decoder.training and getattr(decoder, "gradient_checkpointing", False)):
                cache = kwargs[cache_name] = st.new_cache()
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        new = tokens.shape[1] if tokens is not None else 0
        decoding = new == 1 and cache is not None and cache.get_seq_length() > 0
        record = DecoderForward(cache if isinstance(cache, TwilightCache) else None)
        if not isinstance(cache, TwilightCache):
            if cache is not None:
                st.dense_cause = (f"the cache passed in is a {type(cache).__name__}, not a Twilight cache: decode "
                                  "steps run dense. Pass twilight.integrations.hf.make_cache(model), or no cache.")
                st.warn_once("foreign", st.dense_cause)
        else:
            if self.model.config._attn_implementation != st.attn_name:
                st.dense_cause = (f"config._attn_implementation was changed to "
                                  f"{self.model.config._attn_implementation!r} after twilight.patch: decode steps "
                                  "run dense; call twilight.patch(model, ...) again to re-enable Twilight")
                st.warn_once("impl", st.dense_cause)
            if new > 1 or cache.get_seq_length() == 0:  # prefill (or a chunk of it): read the left padding
                cache.set_padding(kwargs.get("attention_mask"))
            elif cache.padding_error is not None:
                raise ValueError(cache.padding_error)
        token = ACTIVE_FORWARD.set(record)
        try:
            out = original(*args, **kwargs)
        finally:
            ACTIVE_FORWARD.reset(token)
        if new > 1 and isinstance(cache, TwilightCache) and not torch.compiler.is_compiling():
            cache.prepare_decode()  # derived structures built now, eagerly: every decode step derives one token
        if decoding:
            st.counts.add_(torch.tensor([1, int(record.served > 0)]))
        return out


class _PrepareCache(_Wrapper):
    """The model's ``_prepare_cache_for_generation``: ``generate()`` gets a ``TwilightCache`` allocated once at the
    call's final length (prompt plus new tokens), not a ``DynamicCache``; ``cache_implementation="static"`` (a
    cache preallocated at that length, or at ``max_cache_len``) gets the same."""

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        model_kwargs, generation_config = bound.get("model_kwargs"), bound.get("generation_config")
        users_cache = None if model_kwargs is None else compat.find_cache(model_kwargs)[1]
        impl = getattr(generation_config, "cache_implementation", None)
        static = impl == "static" and model_kwargs is not None and users_cache is None
        if static:  # transformers would allocate a StaticCache only for us to drop it: let it build its empty default
            generation_config.cache_implementation = None
        try:
            result = self.__wrapped__(*args, **kwargs)
        finally:
            if static:
                generation_config.cache_implementation = impl
        if model_kwargs is None:
            return result
        if users_cache is not None:  # the user's own: the forward wrapper warns if it is not a Twilight cache
            if isinstance(users_cache, TwilightCache):
                self._ready(users_cache, model_kwargs, generation_config)
            return result
        name, cache = compat.find_cache(model_kwargs)
        if isinstance(cache, TwilightCache):
            self._ready(cache, model_kwargs, generation_config)
            return result
        if cache is None:
            if getattr(generation_config, "use_cache", True) is False:
                return result  # no cache asked for
            name = self.patch_state().cache_name  # some releases (5.0) leave the default cache to the model's forward
        elif not compat.is_plain_dynamic_cache(cache):
            raise ValueError(f"twilight.patch manages its own cache; generate(cache_implementation={impl!r}) "
                             f"created a {type(cache).__name__}, which Twilight cannot decode with. Leave "
                             "cache_implementation unset, or use 'dynamic' or 'static' (both give Twilight's cache, "
                             "allocated once at the final length).")
        cache = model_kwargs[name] = self.patch_state().new_cache(self._final_length(bound, generation_config, static),
                                                                  getattr(self.model, "device", None))
        self._ready(cache, model_kwargs, generation_config)
        return result

    @staticmethod
    def _ready(cache: TwilightCache, model_kwargs: dict, generation_config) -> None:
        """Read the left padding from ``generate()``'s 2-D mask now (with a compileable cache the model only ever
        sees 4-D masks), and refuse a compile config that would recompile every step."""
        cache.set_padding(model_kwargs.get("attention_mask"))
        compile_config = getattr(generation_config, "compile_config", None)
        if cache.is_compileable and compile_config is not None and compile_config.dynamic is False:
            raise ValueError("generate(compile_config=CompileConfig(dynamic=False)) cannot compile Twilight's decode "
                             "step: its cache grows by one position per step, which dynamic=False turns into one "
                             "recompilation per step. Use dynamic=None (the default) or dynamic=True.")

    @staticmethod
    def _final_length(bound: dict, generation_config, static: bool) -> int | None:
        """The positions the cache will hold: ``generate()``'s ``max_cache_length`` (its ``max_length - 1``: the
        last new token is never fed back), at least ``max_cache_len`` for a static cache, as transformers sizes it."""
        length = bound.get("max_cache_length")
        if length is None:
            max_length = getattr(generation_config, "max_length", None)
            length = None if max_length is None else max_length - 1
        if static and getattr(generation_config, "max_cache_len", None) is not None:
            length = max(length or 0, generation_config.max_cache_len)
        return length


class _Generate(_Wrapper):
    """The model's ``generate``: warns when a call decoded tokens and none of its steps went through Twilight."""

    def __call__(self, *args, **kwargs):
        self.patch_state().dense_cause = None
        before = engagement(self.model)
        out = self.__wrapped__(*args, **kwargs)
        bypassed = bypassed_steps(before, engagement(self.model))
        if bypassed is not None:
            warnings.warn(f"generate() ran {bypassed[0]} decode step(s) on a model patched by twilight.patch and "
                          f"none went through Twilight: {bypassed[1]}", RuntimeWarning, stacklevel=2)
        return out


def _wrap(model, state: _PatchState, owner, name: str, wrapper_type: type) -> None:
    wrapper = wrapper_type(model, state, owner, name)
    wrapper.signature  # noqa: B018 - fail at patch time on a method inspect cannot read
    _set_instance_attr(state, owner, name, wrapper)


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
            dtype, tensor parallel (``tp_plan``) included. Its attention implementation (``sdpa``, ``eager``,
            flash…) keeps serving prefill.
        spec: preset name (``twilight.PRESETS``), JSON path, dict or ``TwilightConfig``; copied, so later
            changes to the object do not reach the model.
    Returns:
        ``model`` (patched in place). Patching an already-patched model replaces its config and starts new
        ``budget_stats``; caches created before keep the config they were built with.
    Raises:
        ValueError: unsupported model family, or a config that does not fit the model.
        UnsupportedTransformersError: a transformers release outside the supported range, or one whose
            calling convention twilight does not recognise.

    Example::

        >>> twilight.patch(model, "quest-twilight")
        >>> out = model.generate(**tok("...", return_tensors="pt"), max_new_tokens=16)
        >>> twilight.budget_stats(model).as_dict()["attended_fraction"]
    """
    check_supported(model)
    config = TwilightConfig.load(spec)
    decoder, attention = _decoder_and_attention(model)
    num_layers = len(attention)
    hq, hkv = local_head_counts(model, attention)
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
    cache_name = compat.cache_parameter(decoder.forward, type(decoder).__name__)
    has_generate = compat.check_generation_hook(model) is not None
    attn_name = register(delegate)
    state = _PatchState(pipeline=pipeline, num_layers=num_layers, attn_name=attn_name, delegate=delegate,
                        cache_name=cache_name)
    try:
        for cfg in _attention_configs(model, attention):
            state.configs.append((cfg, compat.attn_implementation_override(cfg)))
            compat.set_attn_implementation(cfg, attn_name)
        _wrap(model, state, decoder, "forward", _DecoderForward)
        if has_generate:
            _wrap(model, state, model, "_prepare_cache_for_generation", _PrepareCache)
            _wrap(model, state, model, "generate", _Generate)
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
        compat.set_attn_implementation(cfg, previous)
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


def make_cache(model, max_cache_len: int | None = None, observe_for=()) -> TwilightCache:
    """A fresh, empty ``TwilightCache`` for a patched ``model`` (to pass as ``cache=`` / ``past_key_values=``).

    ``max_cache_len``: the most positions it will hold (prompt plus new tokens), when you know it: every layer's
    buffers are then allocated once at that length (rounded up to whole int4 tiles and pages) and hold nothing
    spare. Without it (or past it) the cache grows by a quarter at a time. ``generate()`` passes its own length.
    ``observe_for``: configs (``TwilightConfig``, preset names, dicts) that will decode from a ``fork_cache`` of
    this cache: their selectors watch its prefill too (``snapkv``, ``h2o``), so one prefill serves them all.
    """
    return _state(model).new_cache(max_cache_len, getattr(model, "device", None), observe_for)


def fork_cache(model, cache: TwilightCache) -> TwilightCache:
    """A new ``TwilightCache`` for the config ``model`` is patched with now, holding a copy of ``cache``'s tokens.

    The K/V, the left padding and what the selectors observed in the prompt (``LayerCache.observations``) are
    copied; everything a config derives from them (int4 keys, page bounds, selector state) is rebuilt by the new
    config when it first decodes. Prefill a prompt once, then decode it under several configs::

        twilight.patch(model, "dense")
        cache = twilight.integrations.hf.make_cache(model)
        model(input_ids=ids, cache=cache)                # cache=: past_key_values= before transformers 5.24
        twilight.patch(model, "quest-twilight")
        model.generate(..., cache=twilight.integrations.hf.fork_cache(model, cache))

    ``snapkv`` and ``h2o`` read observations made by the same selector type, window and dense layers
    (``twilight.select.observation_key``): fork such a cache only between configs with equal keys, or make it with
    ``make_cache(model, observe_for=[configs...])`` so that their selectors watch the prefill too.
    """
    if not isinstance(cache, TwilightCache):
        raise TypeError(f"cache must be a TwilightCache, got {type(cache).__name__}")
    new = make_cache(model, cache.final_length)
    if len(new.layers) != len(cache.layers):
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(new.layers)}")
    new.start, new._start_list, new.padding_error = cache.start, cache._start_list, cache.padding_error
    for src, dst in zip(cache.layers, new.layers, strict=True):
        dst.start = src.start
        if src.cache is None:
            continue
        dst.update(src.cache.keys(), src.cache.values())  # copied into the new cache's own storage
        dst.cache.observations = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                  for k, v in src.cache.observations.items()}
    return new


def engagement(model) -> dict:
    """How many decode forwards the patched ``model`` ran, and in how many Twilight ran the attention.

    ``{"decode_forwards": int, "twilight_forwards": int, "dense_cause": str | None}``, counted since ``patch``
    (single-token forwards over a non-empty cache, whatever the cache). A caller checks a run by comparing two
    readings: decode forwards without Twilight forwards mean the run was dense, for ``dense_cause``.
    """
    st = _state(model)
    return {"decode_forwards": st.decode_forwards, "twilight_forwards": st.twilight_forwards,
            "dense_cause": st.dense_cause}


def bypassed_steps(before: dict, after: dict) -> tuple[int, str] | None:
    """``(decode forwards, cause)`` when decode forwards ran between two ``engagement`` readings and none of them
    went through Twilight; ``None`` otherwise (including when nothing was decoded)."""
    decoded = after["decode_forwards"] - before["decode_forwards"]
    if not decoded or after["twilight_forwards"] != before["twilight_forwards"]:
        return None
    return decoded, after.get("dense_cause") or "no decode step reached Twilight's attention function"


def budget_stats(model) -> BudgetStats:
    """The live ``BudgetStats`` of a patched model (``as_dict()``, ``summary()``, ``plot(path)``, ``reset()``).

    Under tensor parallelism these are this rank's heads; ``twilight.integrations.hf.gather_budget_stats``
    collects every rank's.
    """
    return _state(model).pipeline.stats


def gather_budget_stats(model) -> BudgetStats:
    """Budget stats over every head of a tensor-parallel ``model``: each rank's heads, in rank order.

    A collective: every rank calls it and gets the same result. For a model that is not sharded it returns
    ``twilight.budget_stats(model)`` itself.
    """
    return gather_stats(model, budget_stats(model))
