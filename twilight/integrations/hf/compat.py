"""Everything the Hugging Face integration reads from transformers' internals, in one place.

Checked against transformers 5.0.0, 5.16.1, 5.23.0 and 5.24.0 (the internals below were compared release by
release from 5.0 to 5.24; ``scripts/test.sh`` runs the integration tests against the oldest and the newest
release of ``SUPPORTED_TRANSFORMERS``). What moved inside that range:

- **The cache's name.** Up to 5.23 the models' ``forward``, ``generate()``'s ``model_kwargs`` and the model
  outputs call the cache ``past_key_values``; from 5.24 on they call it ``cache`` (``past_key_values`` is
  still accepted by a ``deprecate_kwarg`` decorator). ``cache_parameter`` reads which name a ``forward``
  takes from its signature; ``find_cache`` looks for both spellings in a call's keyword arguments.
- ``CacheLayerMixin``'s abstract "no maximum length" method is ``get_max_cache_shape`` up to 5.12 and
  ``get_max_length`` from 5.13; ``TwilightLayer`` defines both. Its ``get_mask_sizes`` takes the query's
  ``cache_position`` up to 5.3 and the query length from 5.4; ``TwilightLayer`` accepts both.
- ``generate()`` marks a cache the user passed in (``_is_user_defined``) only from 5.17, so the patch tells a
  user's cache from the one ``generate()`` builds by looking before ``_prepare_cache_for_generation`` runs.
- Unchanged over the range: ``Cache(layers=...)``, the ``AttentionInterface`` / ``AttentionMaskInterface``
  registries, ``config._attn_implementation_internal``,
  ``GenerationMixin._prepare_cache_for_generation(generation_config, model_kwargs, ...)``, a
  ``DynamicCache``'s ``offloading`` flag, and ``eager_attention_forward`` in each modeling module.
- Tensor parallelism: ``model.tp_size`` and the device mesh ``model._device_mesh`` (checked on 5.24).

A release that passes the cache under a name this module does not know, or prepares ``generate()``'s cache
without ``model_kwargs``, makes ``twilight.patch`` raise ``UnsupportedTransformersError`` naming what it could
not find; a decode step that still bypasses Twilight at run time raises ``TwilightNotEngagedError`` (see
``twilight.integrations.hf.attention``). Neither lets decoding run dense in silence.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Mapping

__all__ = ["SUPPORTED_TRANSFORMERS", "OLDEST_TRANSFORMERS", "CHECKED_RELEASES", "CACHE_NAMES",
           "UnsupportedTransformersError", "check_transformers_version", "cache_parameter", "find_cache",
           "output_cache", "Cache", "CacheLayerMixin", "DynamicCache", "register_attention", "attention_function",
           "set_attn_implementation", "attn_implementation_override", "is_plain_dynamic_cache", "tensor_parallel_group",
           "check_generation_hook"]

#: Supported transformers releases (a PEP 440 specifier), the same as pyproject.toml's ``dependencies``.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
#: The oldest release of that range: scripts/test_transformers_range.sh tests it beside the newest.
OLDEST_TRANSFORMERS = "5.0.0"
#: The releases this module was read against (both ends of the range are tested by scripts/test.sh).
CHECKED_RELEASES = ("5.0.0", "5.16.1", "5.23.0", "5.24.0")
#: The names a model's ``forward`` and ``generate()`` give the cache: the current one first.
CACHE_NAMES = ("cache", "past_key_values")


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is outside the supported range, or changed an interface Twilight reads."""


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``UnsupportedTransformersError`` unless the installed (or given) transformers release is supported."""
    from packaging.specifiers import SpecifierSet

    if version is None:
        import transformers

        version = transformers.__version__
    if not SpecifierSet(SUPPORTED_TRANSFORMERS).contains(version, prereleases=True):
        raise UnsupportedTransformersError(
            f"twilight.patch supports transformers{SUPPORTED_TRANSFORMERS} (the range declared in pyproject.toml); "
            f"transformers {version} is installed")


try:  # transformers is a hard dependency of the integration; `patch` checks the version first
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
except ImportError as e:  # pragma: no cover - transformers < 4.56 has no CacheLayerMixin
    raise UnsupportedTransformersError(f"twilight.integrations.hf needs transformers{SUPPORTED_TRANSFORMERS}: {e}") \
        from e


# ---------------------------------------------------------------------------------------------------- cache name
def cache_parameter(forward: Callable, owner: str) -> str:
    """The keyword under which ``forward`` takes the cache (``cache`` or ``past_key_values``).

    Raises ``UnsupportedTransformersError`` when the signature has neither: a calling convention this
    module does not know, under which Twilight could never see the cache.
    """
    params = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UnsupportedTransformersError(
        f"{owner}.forward takes the cache under none of the names {', '.join(CACHE_NAMES)} (its parameters: "
        f"{', '.join(params)}); this transformers release passes the cache in a way twilight.patch does not "
        f"recognise (checked releases: {', '.join(CHECKED_RELEASES)})")


def find_cache(kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    """``(name, cache)`` of the cache among a call's keyword arguments (``(None, None)`` when absent)."""
    found = [(name, kwargs[name]) for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(found) > 1:
        raise ValueError(f"both {found[0][0]}= and {found[1][0]}= were given; pass the cache once")
    return found[0] if found else (None, None)


def output_cache(output) -> Any:
    """The cache a model output carries (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    for name in CACHE_NAMES:
        if name in output.keys():
            return output[name]
    return None


# ---------------------------------------------------------------------------------------------------- attention
def register_attention(name: str, function: Callable, mask_like: str) -> None:
    """Register ``function`` as attention implementation ``name``, with ``mask_like``'s mask function."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])


_EAGER_BY_CLASS: dict[type, Callable] = {}


def attention_function(name: str, module) -> Callable:
    """The model's own attention function ``name`` (``eager`` is defined per modeling file)."""
    if name == "eager":
        fn = _EAGER_BY_CLASS.get(type(module))
        if fn is None:
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise UnsupportedTransformersError(
                    f"{type(module).__name__} has no eager_attention_forward to delegate prefill to")
            _EAGER_BY_CLASS[type(module)] = fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


class _Missing:
    """"Not set on the instance": one object that stays itself through ``copy.deepcopy`` and pickle, so that
    ``unpatch`` on a copy of a patched model restores what was unset on the original as unset."""

    def __reduce__(self):
        return "_MISSING"  # pickled (and deep-copied) as a reference to this module's _MISSING

    def __repr__(self):
        return "<not set>"


_MISSING = _Missing()


def attn_implementation_override(config) -> Any:
    """The instance-level ``_attn_implementation_internal`` of ``config`` (a sentinel when unset)."""
    return config.__dict__.get("_attn_implementation_internal", _MISSING)


def set_attn_implementation(config, value: Any) -> None:
    """Set (or, with the sentinel from ``attn_implementation_override``, remove) the implementation override."""
    if value is _MISSING:
        config.__dict__.pop("_attn_implementation_internal", None)
    else:
        config._attn_implementation_internal = value


# ---------------------------------------------------------------------------------------------------- parallelism
def tensor_parallel_group(model):
    """The process group of ``model``'s tensor-parallel ranks, or ``None`` for a model that is not sharded.

    transformers keeps a ``(pp, fsdp, tp)`` device mesh in ``model._device_mesh`` and the degree in
    ``model.tp_size`` (``None`` or 1 without tensor parallelism).
    """
    if (getattr(model, "tp_size", None) or 1) <= 1:
        return None
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        raise UnsupportedTransformersError(f"{type(model).__name__} has tp_size={model.tp_size} but no _device_mesh: "
                                           "this transformers release shards models in a way twilight does not know")
    return mesh["tp"].get_group() if mesh.ndim > 1 else mesh.get_group()


# ---------------------------------------------------------------------------------------------------- generate()
def check_generation_hook(model) -> str | None:
    """The ``model_kwargs`` parameter of ``model._prepare_cache_for_generation`` (``None``: no generate()).

    Raises ``UnsupportedTransformersError`` when the method exists without a ``model_kwargs`` parameter.
    """
    method = getattr(model, "_prepare_cache_for_generation", None)
    if method is None:
        return None
    if "model_kwargs" not in inspect.signature(method).parameters:
        raise UnsupportedTransformersError(
            f"{type(model).__name__}._prepare_cache_for_generation has no model_kwargs parameter; this transformers "
            f"release prepares generate()'s cache in a way twilight.patch does not recognise (checked releases: "
            f"{', '.join(CHECKED_RELEASES)})")
    return "model_kwargs"


def is_plain_dynamic_cache(cache) -> bool:
    """True for the default cache ``generate()`` builds: a ``DynamicCache`` that does not offload."""
    return type(cache) is DynamicCache and not getattr(cache, "offloading", False)
