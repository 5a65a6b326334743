"""The selector registry: ``selector.type`` -> a `SelectorSpec`, everything the library knows about that selector.

A selector is one module that registers itself (``twilight/select/quest.py``, ``streaming.py``, ``topk.py``,
``tidal.py``, ``double_sparse.py``, ``prefill.py``, ``full.py``): its name, how to build it, the config fields it
owns and their checks, its spellings in the original Twilight code's config files, what it watches at prefill,
what its cache keeps, and a check against the model's shape. ``SelectorConfig`` validation, ``make_selector``,
``observation_key``, ``_from_legacy``, ``TwilightPipeline`` and the README's selector table read this registry;
none of them names a selector.

A selector of your own, from any module (see tests/test_registry.py)::

    register_selector(SelectorSpec(
        name="first_k", build=lambda cfg, layer_idx, num_layers: FirstK(cfg.extra["k"]),
        picks="the first k valid tokens", params={"k": 4}, validate=check_first_k))
    TwilightConfig.load({"selector": {"type": "first_k", "k": 8}})

``params`` are the selector's own config keys beyond ``SelectorConfig``'s fields (read back as
``cfg.selector.extra[name]``; ``to_dict`` writes them beside the other selector keys); ``validate`` checks them
(raise ``twilight.config.ConfigError`` naming ``selector.<key>``). ``with registered(spec): ...`` undoes the
registration on exit.

This module imports nothing: ``twilight.config`` reads it lazily (importing it runs ``twilight.select``, the
package, which imports and so registers every built-in selector, in ``SELECTOR_TYPES`` order).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

__all__ = ["SelectorSpec", "SELECTORS", "GQA_SUPPORT", "register_selector", "unregister_selector", "registered",
           "selector_table"]

#: ``SelectorSpec.gqa``: ``"group"``, implements ``gqa="group"`` only; ``"both"``, implements ``"group"`` and
#: ``"head"`` (it scores per query head); ``"equal"``, scores nothing, so both modes are the same selection.
GQA_SUPPORT = ("group", "both", "equal")


@dataclass(frozen=True)
class SelectorSpec:
    """One selector, as the registry knows it. Every hook is optional but ``build``.

    name: its ``selector.type``.
    build: ``build(cfg, layer_idx, num_layers) -> selector``, the callable ``selector(q, cache, plan) ->
        Selection`` of one layer (``cfg`` a validated ``SelectorConfig``; ``num_layers`` may be ``None``).
    picks: one line, what it selects (the README's selector table).
    gqa: which ``selector.gqa`` modes it implements (``GQA_SUPPORT``).
    fields: the ``SelectorConfig`` fields it owns (the README's "its own fields"); ``fields_doc``: that cell's
        text when it says more than their names.
    params: its own config keys that are not ``SelectorConfig`` fields, with their defaults (``cfg.extra``).
    check_fields: ``check_fields(cfg)`` checks the values of its ``fields``; run on every ``SelectorConfig``,
        whatever its type, since every config holds every field.
    validate: ``validate(cfg)``: the rules of a config of this type (its ``params`` included).
    legacy_names: its ``selector.type`` spellings in the original Twilight code's config files.
    from_legacy: ``from_legacy(section)`` rewrites, in place, such a file's ``selector`` section of this type
        into our keys (``twilight.config._from_legacy`` does the keys every selector shares).
    observes: ``observes(cfg)``: what it records while watching a prompt (``TwilightPipeline.observe``), part of
        ``observation_key``; ``None``: it watches nothing.
    cache_needs: ``cache_needs(cfg, layer_idx, num_kv_heads) -> dict`` of what a sparse layer's ``LayerCache``
        must keep for it: ``keep_page_bounds``, ``label_channels``, ``label_bits``.
    check_model: ``check_model(config, num_layers)``: raise ``ConfigError`` when the ``TwilightConfig`` cannot
        run on a model of that depth (``TwilightPipeline`` calls it for a sparse config).
    """

    name: str
    build: Callable[..., Any]
    picks: str = ""
    gqa: str = "group"
    fields: tuple[str, ...] = ()
    fields_doc: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    check_fields: Callable[[Any], None] | None = None
    validate: Callable[[Any], None] | None = None
    legacy_names: tuple[str, ...] = ()
    from_legacy: Callable[[dict], None] | None = None
    observes: Callable[[Any], Any] | None = None
    cache_needs: Callable[[Any, int, Any], dict] | None = None
    check_model: Callable[[Any, int], None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a selector's name must be an identifier, got {self.name!r}")
        if self.gqa not in GQA_SUPPORT:
            raise ValueError(f"selector {self.name!r}: gqa={self.gqa!r} must be one of {', '.join(GQA_SUPPORT)}")
        if not callable(self.build):
            raise ValueError(f"selector {self.name!r}: build must be callable")


#: ``selector.type`` -> its spec, in registration order (``SELECTOR_TYPES``).
SELECTORS: dict[str, SelectorSpec] = {}


def register_selector(spec: SelectorSpec) -> SelectorSpec:
    """Add ``spec`` under ``spec.name`` (a name or legacy spelling already registered is an error)."""
    if spec.name in SELECTORS:
        raise ValueError(f"selector {spec.name!r} is already registered")
    taken = {alias: s.name for s in SELECTORS.values() for alias in (s.name, *s.legacy_names)}
    clash = sorted(alias for alias in spec.legacy_names if alias in taken)
    if clash:
        raise ValueError(f"selector {spec.name!r}: legacy name(s) {clash} already name "
                         f"{sorted({taken[a] for a in clash})}")
    taken_keys = set(spec.params) & set(_config_keys())
    if taken_keys:
        raise ValueError(f"selector {spec.name!r}: params {sorted(taken_keys)} are SelectorConfig fields; "
                         "list them in `fields`")
    SELECTORS[spec.name] = spec
    return spec


def unregister_selector(name: str) -> SelectorSpec:
    """Remove and return the selector registered as ``name``."""
    if name not in SELECTORS:
        raise KeyError(f"no selector {name!r} is registered")
    return SELECTORS.pop(name)


@contextlib.contextmanager
def registered(spec: SelectorSpec) -> Iterator[SelectorSpec]:
    """``register_selector(spec)`` for the ``with`` block only."""
    register_selector(spec)
    try:
        yield spec
    finally:
        if SELECTORS.get(spec.name) is spec:
            del SELECTORS[spec.name]


def _config_keys() -> tuple[str, ...]:
    """``SelectorConfig``'s field names: the shared ones and those the registered selectors own (the built-in
    selectors own every other field)."""
    return tuple(name for spec in SELECTORS.values() for name in spec.fields) + (
        "type", "token_budget", "gqa", "extra")


_GQA_CELL = {"group": "`group`", "both": "`group`, `head`", "equal": "both equal"}


def selector_table() -> str:
    """The README's selector table (markdown), one row per registered selector, in order."""
    rows = ["| selector | picks | `gqa` | its own fields |", "|---|---|---|---|"]
    for spec in SELECTORS.values():
        own = spec.fields_doc if spec.fields_doc is not None else ", ".join(
            f"`{name}`" for name in (*spec.fields, *spec.params))
        rows.append(f"| `{spec.name}` | {spec.picks} | {_GQA_CELL[spec.gqa]} | {own} |".replace("|  |", "| |"))
    return "\n".join(rows)
