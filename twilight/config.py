"""`TwilightConfig`: which selector, estimator and pruner a patched model uses.

A config loads from a preset name, a JSON file, a dict (our schema or the original Twilight
code's, e.g. every file in its ``benchmark/configs``) or another config, validates every field, and
saves back to JSON::

    cfg = TwilightConfig.load("quest-twilight")
    cfg = TwilightConfig.load({"selector": {"type": "quest", "token_budget": 4096, "page_size": 16},
                               "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.9}})
    cfg.save("my.json")
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

#: How a selector chooses under GQA (``SelectorConfig.gqa``): ``"group"``, one set per kv-head shared by its query
#: heads (scored by the group's largest score); ``"head"``, each query head its own ``token_budget`` tokens, as the
#: original Twilight code selects (it repeats K/V per query head before every selector).
GQA_MODES = ("group", "head")
POOLINGS = ("avgpool", "maxpool")  # how snapkv smooths its prompt votes
ESTIMATOR_TYPES = ("exact", "int8", "int4")
PRUNER_TYPES = ("none", "top_p", "top_k", "threshold")
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda", "flashinfer")
CHANNELS_KEYS = ("q", "k", "qk")  # which projection's channel list a DoubleSparse channel file is read from
MAX_LABEL_BITS = 16
#: ``dense_below="auto"`` by device type: the context below which a sparse decode step costs more than a dense
#: one, measured end to end by ``twilight bench e2e`` (benchmarks/README.md, "The dense crossover"): on the CPU,
#: SmolLM2 with the cpu backend (Quest and the int4 estimate in C++) decoded sparse as fast as dense at 1k
#: tokens (within noise) and faster at 2k (2026-11-30, 1 thread): 1,536. CUDA: 0 (sparse from the first step);
#: on an H200 the eager patched model at batch 1 was slower sparse than dense at 4k and 32k, the operator at
#: batch 16 and 64 faster: a context threshold cannot follow a batch-dependent crossover, so it stays 0 until the
#: step runs under a CUDA graph and is measured again.
DENSE_BELOW_AUTO = {"cpu": 1536, "cuda": 0}


def _selectors() -> dict:
    """The selector registry (``twilight.select.registry.SELECTORS``), read when first needed: importing it imports
    ``twilight.select``, which registers the built-in selectors (and imports torch)."""
    from twilight.select.registry import SELECTORS

    return SELECTORS


def __getattr__(name: str) -> Any:
    # SELECTOR_TYPES: every registered selector type, in registration order. GQA_HEAD_SELECTORS: those that score per
    # query head and implement both modes (full and streaming score nothing: both modes are equal for them; h2o
    # implements "group" only).
    if name == "SELECTOR_TYPES":
        return tuple(_selectors())
    if name == "GQA_HEAD_SELECTORS":
        return tuple(n for n, spec in _selectors().items() if spec.gqa == "both")
    raise AttributeError(f"module 'twilight.config' has no attribute {name!r}")


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range. The message names the field."""


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"must be an integer >= {minimum}")
    if value < minimum:
        _fail(name, value, f"must be an integer >= {minimum}")
    return value


def _check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        _fail(name, value, "must be a number in (0, 1]")
    return float(value)


@dataclass
class SelectorConfig:
    """Coarse candidate selection.

    type: one of ``full | quest | streaming | double_sparse | oracle_topk | sparq | tidal | snapkv | h2o``.
    token_budget: candidates kept per kv-head under ``gqa="group"``, per query head under ``gqa="head"`` (quest,
        double_sparse, oracle_topk, sparq, tidal; snapkv: prompt tokens kept, observation window included; h2o:
        heavy hitters plus recent tokens).
    gqa: how the selection is shared under GQA (``GQA_MODES``). ``"group"`` (default, our presets): one set per
        kv-head, a token scored by the largest score any query head of its group gives it, and every query head
        of the group attends to that set. ``"head"`` (what the original Twilight code does, and what its config
        files load as): each query head selects its own ``token_budget`` tokens and attends only to them (with a
        pruner, each head prunes its own candidates); the kv-head reads the union. Both modes are equal for
        ``full`` and ``streaming`` (they score nothing) and with one query head per kv-head; ``h2o`` implements
        ``"group"`` only.
    page_size: tokens per Quest page.
    sink_tokens / window: streaming's always-kept first tokens and recent window.
    channels_path: double_sparse's label-channel JSON: one written by
        ``twilight.select.double_sparse.calibrate`` (or ``twilight.integrations.capture.calibrate_double_sparse``),
        or a DoubleSparse channel file (``{"model.layers.<i>.self_attn.<q|k|qk>_proj": [[...], ...]}``).
    num_channels: label channels per head used by double_sparse (the most important ones of the file); for
        sparq, ``r``: the channels of largest ``|q|`` each query head scores with (at most head_dim).
    label_bits: bit width of a per-token min-max quantization of the key label vectors that
        double_sparse scores against (1..16), or ``None`` (default) for no quantization.
    channels_key: which projection's channel lists to read from a DoubleSparse channel file:
        ``"k"`` (default), ``"q"`` or ``"qk"``; ignored for our own calibrate files.
    reselection_layers: tidal's token re-selection layers, which attend to every token and pick the top
        ``token_budget`` tokens that the following layers reuse; ``None`` (default): layer 2 and layer
        ``round(13 / 32 * num_layers)``, as TidalDecode runs Llama-3-8B (layers 2 and 13 of 32). Layers before the
        first re-selection layer attend to every token.
    observation_window: snapkv's window of last prompt tokens whose queries vote for the prompt tokens to keep
        (they are kept too).
    kernel_size: snapkv's pooling width over the votes (odd).
    pooling: ``avgpool`` (default) or ``maxpool``.
    recent_tokens: h2o's recent window, part of ``token_budget``; ``None`` (default): half the budget, as H2O
        splits it between heavy hitters and recent tokens.
    extra: the parameters of a registered selector that are not fields here (``SelectorSpec.params``), by name;
        in a dict or JSON config they sit beside the other selector keys.

    Each field above belongs to a selector (``SelectorSpec.fields`` in ``twilight.select.registry``), which checks
    its values; every config holds every field, so every value is checked whatever the type.
    """

    type: str = "full"
    token_budget: int = 8192
    gqa: str = "group"
    page_size: int = 16
    sink_tokens: int = 4
    window: int = 1024
    channels_path: str | None = None
    num_channels: int = 16
    label_bits: int | None = None
    channels_key: str = "k"
    reselection_layers: list[int] | None = None
    observation_window: int = 32
    kernel_size: int = 7
    pooling: str = "avgpool"
    recent_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        selectors = _selectors()
        if not isinstance(self.type, str) or self.type not in selectors:
            _fail("selector.type", self.type, f"must be one of {', '.join(selectors)}")
        spec = selectors[self.type]
        _check_int("selector.token_budget", self.token_budget, 1)
        if self.gqa not in GQA_MODES:
            _fail("selector.gqa", self.gqa, f"must be one of {', '.join(GQA_MODES)} (group: one selection per "
                  "kv-head shared by its query heads; head: each query head its own)")
        if self.gqa == "head" and spec.gqa == "group":
            both = [n for n, s in selectors.items() if s.gqa == "both"]
            equal = " and ".join(n for n, s in selectors.items() if s.gqa == "equal")
            _fail("selector.gqa", self.gqa, f"selector.type={self.type!r} implements gqa='group' only; gqa='head' "
                  f"is implemented by {', '.join(both)} (and equals 'group' for {equal})")
        for other in selectors.values():  # every config holds every field: check them all, whatever the type
            if other.check_fields is not None:
                other.check_fields(self)
        if not isinstance(self.extra, Mapping):
            _fail("selector.extra", self.extra, "must be a dict of the selector's own parameters")
        unknown = sorted(set(self.extra) - set(spec.params))
        if unknown:
            raise ConfigError(f"unknown selector key(s) {unknown} for type {self.type!r}; "
                              f"allowed keys: {sorted(_selector_keys(self.type))}")
        self.extra = {**spec.params, **self.extra}
        if spec.validate is not None:
            spec.validate(self)

    def default_reselection_layers(self, num_layers: int) -> list[int]:
        """tidal's re-selection layers for a model of ``num_layers`` (``reselection_layers`` when given)."""
        if self.reselection_layers is not None:
            return list(self.reselection_layers)
        return sorted({min(2, num_layers - 1), min(round(13 / 32 * num_layers), num_layers - 1)})

    @property
    def h2o_recent(self) -> int:
        """h2o's recent window: ``recent_tokens``, or half of ``token_budget``."""
        return self.token_budget // 2 if self.recent_tokens is None else self.recent_tokens


@dataclass
class EstimatorConfig:
    """Score estimation on the candidates: ``exact | int8 | int4`` (quantized copy of K)."""

    type: str = "int4"

    def validate(self) -> None:
        if self.type not in ESTIMATOR_TYPES:
            _fail("estimator.type", self.type, f"must be one of {', '.join(ESTIMATOR_TYPES)}")

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.type)


@dataclass
class PrunerConfig:
    """Pruning of the candidates: ``none | top_p | top_k | threshold``.

    p: attention mass kept per query head (top_p), in (0, 1].
    k: tokens kept per query head (top_k), >= 1.
    threshold: minimum normalised attention weight kept (threshold), in (0, 1].
    """

    type: str = "top_p"
    p: float = 0.85
    k: int = 256
    threshold: float = 1e-3

    def validate(self) -> None:
        if self.type not in PRUNER_TYPES:
            _fail("pruner.type", self.type, f"must be one of {', '.join(PRUNER_TYPES)}")
        self.p = _check_unit_interval("pruner.p", self.p)
        _check_int("pruner.k", self.k, 1)
        self.threshold = _check_unit_interval("pruner.threshold", self.threshold)


@dataclass
class TwilightConfig:
    """Everything a patched model needs to know. See ``TwilightConfig.load`` for the accepted forms."""

    selector: SelectorConfig = field(default_factory=SelectorConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    dense_layers: list[int] = field(default_factory=lambda: [0, 1])
    backend: str = "auto"
    #: Decode densely while the longest sequence holds fewer valid tokens than this (every layer: where sparsity
    #: cannot pay for its own work, a patched model must not be slower than the unpatched one). ``"auto"``: the
    #: crossover measured for the device (``DENSE_BELOW_AUTO``); ``0``: always sparse, as the papers evaluate.
    dense_below: int | str = "auto"
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TwilightConfig":
        for part, cls in (("selector", SelectorConfig), ("estimator", EstimatorConfig), ("pruner", PrunerConfig)):
            if not isinstance(getattr(self, part), cls):
                _fail(part, getattr(self, part), f"must be a {cls.__name__}")
            getattr(self, part).validate()
        if isinstance(self.dense_layers, (str, bytes)) or not isinstance(self.dense_layers, Sequence):
            _fail("dense_layers", self.dense_layers, "must be a list of layer indices >= 0")
        self.dense_layers = [_check_int("dense_layers[]", i, 0) for i in self.dense_layers]
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"must be one of {', '.join(BACKENDS)}")
        if self.dense_below != "auto" and (isinstance(self.dense_below, bool) or not isinstance(self.dense_below, int)
                                           or self.dense_below < 0):
            _fail("dense_below", self.dense_below, "must be 'auto' or an integer >= 0 (tokens)")
        return self

    def crossover(self, device: Any) -> int:
        """``dense_below`` on ``device``: the number itself, or the measured default for the device's type."""
        if self.dense_below != "auto":
            return self.dense_below
        kind = str(device).split(":")[0]  # a torch.device or its name
        return DENSE_BELOW_AUTO.get(kind, 0)

    @property
    def is_dense(self) -> bool:
        """True when every decode step attends to every token (full selector, no pruning)."""
        return self.selector.type == "full" and self.pruner.type == "none"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: "str | os.PathLike | Mapping[str, Any] | TwilightConfig") -> "TwilightConfig":
        """Build a config from a preset name, a JSON path, a dict or a config (copied).

        A JSON path that is missing, a directory, unreadable, not UTF-8 or not valid JSON raises ``ConfigError``
        naming the file (and, for bad JSON, the line and column; the ``json.JSONDecodeError`` is its
        ``__cause__``).
        """
        if isinstance(spec, TwilightConfig):
            return copy.deepcopy(spec).validate()
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)):
            text = os.fspath(spec)
            if text in PRESETS:
                return cls.from_dict(PRESETS[text], name=text)
            if text.endswith(".json") or os.path.exists(text):
                return cls.from_dict(_read_json(text), name=os.path.splitext(os.path.basename(text))[0])
            raise ConfigError(f"config {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file")
        raise ConfigError(f"config must be a preset name, JSON path, dict or TwilightConfig, got {type(spec).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> "TwilightConfig":
        """Our schema, or the original Twilight code's (detected by its ``weight_estimator`` key)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        if any(k in data for k in ("weight_estimator", "weight_pruner", "skip_first_two_layers", "compressor",
                                   "use_estimated_weights_in_attn")):
            data = _from_legacy(data)
        known = {"selector", "estimator", "pruner", "dense_layers", "backend", "dense_below", "name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "selector" in data:
            kwargs["selector"] = _selector_from_dict(data["selector"])
        for part, sub in (("estimator", EstimatorConfig), ("pruner", PrunerConfig)):
            if part in data:
                kwargs[part] = _sub_from_dict(part, sub, data[part])
        if "dense_layers" in data:
            kwargs["dense_layers"] = data["dense_layers"]
        if "backend" in data:
            kwargs["backend"] = data["backend"]
        if "dense_below" in data:
            kwargs["dense_below"] = data["dense_below"]
        kwargs["name"] = name or data.get("name", "custom")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as ``from_dict`` reads it back (a selector's ``extra`` parameters beside its other keys)."""
        data = dataclasses.asdict(self)
        data["selector"].update(data["selector"].pop("extra"))
        return data

    def canonical_json(self) -> str:
        """Every setting as JSON with sorted keys and no whitespace, ``name`` left out: two configs give the same
        string exactly when they configure the same thing (``twilight eval`` keys its resume on it)."""
        data = self.to_dict()
        data.pop("name", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def save(self, path: "str | os.PathLike") -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes: Any) -> "TwilightConfig":
        """A validated copy with top-level fields replaced."""
        return dataclasses.replace(copy.deepcopy(self), **changes)


def _read_json(path: str) -> Any:
    """The JSON value in the file ``path``; ``ConfigError`` naming the file when it cannot be read or parsed."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory, not a JSON file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"config file {path!r} is not UTF-8 text: line {line}, byte {err.start}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path!r} is not valid JSON: line {err.lineno}, column {err.colno}: "
                          f"{err.msg}") from err


def _sub_from_dict(part: str, cls: type, data: Any):
    if isinstance(data, str):  # shorthand: {"estimator": "int4"}
        data = {"type": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{part} must be an object with a 'type' key, got {data!r}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown {part} key(s) {unknown}; allowed keys: {sorted(allowed)}")
    return cls(**data)


def _selector_keys(kind: Any) -> set[str]:
    """The keys a selector section of type ``kind`` may hold: ``SelectorConfig``'s fields and the type's params."""
    spec = _selectors().get(kind) if isinstance(kind, str) else None
    return {f.name for f in dataclasses.fields(SelectorConfig)} - {"extra"} | set(spec.params if spec else ())


def _selector_from_dict(data: Any) -> SelectorConfig:
    """``_sub_from_dict`` for the selector: the keys of a registered selector's own ``params`` go to ``extra``."""
    if isinstance(data, str):  # shorthand: {"selector": "quest"}
        data = {"type": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"selector must be an object with a 'type' key, got {data!r}")
    allowed = _selector_keys(data.get("type", "full"))
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown selector key(s) {unknown}; allowed keys: {sorted(allowed)}")
    fields = {f.name for f in dataclasses.fields(SelectorConfig)}
    extra = {k: v for k, v in data.items() if k not in fields}
    return SelectorConfig(**{k: v for k, v in data.items() if k in fields}, **({"extra": extra} if extra else {}))


_MISSING = object()


def _take(section: dict, prefix: str, *names: str) -> tuple[str, Any]:
    """Pop every spelling in ``names`` from ``section``: ``(spelling used, value)``, or ``(names[0], _MISSING)``
    when none is there. Two spellings with different values are an error naming both."""
    found = [(n, section.pop(n)) for n in names if n in section]
    for n, v in found[1:]:
        if v != found[0][1]:
            raise ConfigError(f"{prefix}.{found[0][0]}={found[0][1]!r} and {prefix}.{n}={v!r} disagree: "
                              f"they name the same setting; give one")
    return found[0] if found else (names[0], _MISSING)


def _renamed(legacy_name: str, check, *args) -> Any:
    """``check(*args)``, with a failure's message led by the original config's field name."""
    try:
        return check(*args)
    except ConfigError as err:
        raise ConfigError(f"{legacy_name}: {err}") from None


def _legacy_section(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None or (isinstance(value, Mapping) and not value):  # absent, null or {}
        return None
    if isinstance(value, str):  # shorthand: {"weight_pruner": "none"}
        value = {"type": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be an object with a 'type' key, got {value!r}")
    return dict(value)


def _no_more_keys(section: dict, prefix: str, kind: str, allowed: Sequence[str]) -> None:
    if section:
        raise ConfigError(f"unknown {prefix} key(s) {sorted(section)} for type {kind!r}; "
                          f"allowed keys: {sorted(set(allowed) | {'type'})}")


def _from_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the original Twilight code's config files (all of its ``benchmark/configs`` load).

    Those look like::

        {"compressor": {"type": "none"},
         "selector": {"type": "ds", "quant_bit": 2, "r": 64, "config_path": "longchat.json",
                      "token_budget": 8192, "selected_channel": "q"},
         "weight_estimator": {"type": "min_max_quant", "quant_bit": 4},
         "weight_pruner": {"type": "top_p", "threshold": 0.85},
         "skip_first_two_layers": true, "use_estimated_weights_in_attn": false}

    - ``compressor``: ``none``, or ``snap_kv`` with selector ``none``: the ``snapkv`` selector (SnapKV's choice of
      prompt tokens as a selection over the whole cache, not an eviction); ``window_size`` ->
      ``observation_window``, ``max_capacity_prompt`` -> ``token_budget``, ``kernel_size``, ``pooling`` (left out:
      the original code's defaults, 64, 320, 5 and avgpool).
    - ``use_estimated_weights_in_attn``: only ``false``; we always attend with exact weights.
    - ``selector``: types ``quest | none (full) | streaming | ds (double_sparse) | oracle_topk | sparq |
      tidal_decode (tidal)``; ``chunk_size`` is Quest's ``page_size``, ``budget`` is ``token_budget``; SparQ's
      ``r`` is ``num_channels``, TidalDecode's ``reselection_layers`` keeps its name. For ``ds``:
      ``config_path`` -> ``channels_path``, ``r`` -> ``num_channels``, ``quant_bit`` -> ``label_bits``
      (32 means no quantization), ``selected_channel`` -> ``channels_key``.
    - ``weight_estimator``: ``min_max_quant`` with ``quant_bit`` 4 or 8 -> ``int4``/``int8``;
      ``none`` (exact scores) -> ``exact``; ``max_quant`` is not supported.
    - ``weight_pruner``: ``top_p`` (its ``threshold`` is p; ``top_p``/``p`` are accepted too),
      ``threshold``, ``top_k``, ``none``; no pruner means no pruning.
    - ``skip_first_two_layers`` (default true, as in the original code) -> ``dense_layers`` ``[0, 1]``.
    - ``selector.gqa``: ``head`` unless the file says otherwise: the original code repeats K/V per query head
      (``repeat_kv``) before every selector, so each query head selects its own ``token_budget`` tokens.

    Every other key, anywhere, is a ``ConfigError`` naming it. The selector types' spellings and their own keys
    (SparQ's ``r``, the ``ds`` keys) are the registered selectors' (``SelectorSpec.legacy_names`` and
    ``from_legacy``); the keys every selector shares (``budget``, ``chunk_size``, ``gqa``) are read here.
    """
    allowed = {"compressor", "selector", "weight_estimator", "weight_pruner", "skip_first_two_layers",
               "use_estimated_weights_in_attn", "backend", "name"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in an original-Twilight config; allowed keys: {sorted(allowed)}")
    out: dict[str, Any] = {}

    comp = _legacy_section(data, "compressor")
    snap: dict[str, Any] | None = None
    if comp is not None:
        kind = comp.pop("type", "none")
        if kind == "snap_kv":  # prefill compression becomes the snapkv selector (selection over the whole cache)
            # the original code's defaults where its config leaves a setting out
            snap = {"type": "snapkv", "observation_window": 64, "token_budget": 256 + 64, "kernel_size": 5}
            for legacy_name, ours, check in (("window_size", "observation_window", 1),
                                             ("max_capacity_prompt", "token_budget", 1), ("kernel_size", None, 1)):
                if legacy_name in comp:
                    snap[ours or legacy_name] = _check_int(f"compressor.{legacy_name}", comp.pop(legacy_name), check)
            if "pooling" in comp:
                snap["pooling"] = comp.pop("pooling")
            _no_more_keys(comp, "compressor", kind, ("window_size", "max_capacity_prompt", "kernel_size", "pooling"))
        elif kind != "none":
            _fail("compressor.type", kind, "must be none or snap_kv")
        else:
            _no_more_keys(comp, "compressor", kind, ())
    est_in_attn = data.get("use_estimated_weights_in_attn", False)
    if not isinstance(est_in_attn, bool):
        _fail("use_estimated_weights_in_attn", est_in_attn, "must be false")
    if est_in_attn:
        _fail("use_estimated_weights_in_attn", est_in_attn,
              "attending with the estimated weights is not supported (Twilight attends with the exact "
              "weights of the kept tokens); set it to false")

    sel = _legacy_section(data, "selector") or {"type": "full"}
    aliases = {alias: name for name, spec in _selectors().items() for alias in spec.legacy_names}
    if "type" in sel:
        sel["type"] = aliases.get(sel["type"], sel["type"])
    if snap is not None:
        if sel.get("type", "full") != "full":
            _fail("compressor.type", "snap_kv", f"SnapKV runs here as the snapkv selector, which cannot be combined "
                  f"with selector.type={sel['type']!r}; use selector none with compressor snap_kv")
        sel.pop("type", None)
        clash = sorted(set(sel) & set(snap))
        if clash:
            raise ConfigError(f"selector key(s) {clash} and compressor snap_kv's settings name the same settings; "
                              "give them once")
        sel.update(snap)
    spec = _selectors().get(sel.get("type")) if isinstance(sel.get("type"), str) else None
    if spec is not None and spec.from_legacy is not None:  # the selector's own keys (e.g. ds's config_path)
        spec.from_legacy(sel)
    name, budget = _take(sel, "selector", "token_budget", "budget")
    if budget is not _MISSING:
        sel["token_budget"] = _check_int(f"selector.{name}", budget, 1)
    name, page = _take(sel, "selector", "page_size", "chunk_size")
    if page is not _MISSING:
        sel["page_size"] = _check_int(f"selector.{name}", page, 1)
    # The original code repeats K/V per query head before every selector: each query head selects its own tokens.
    if sel.setdefault("gqa", "head") not in GQA_MODES:
        _fail("selector.gqa", sel["gqa"], f"must be one of {', '.join(GQA_MODES)}")
    out["selector"] = sel

    est = _legacy_section(data, "weight_estimator")
    if est is not None:
        kind = est.pop("type", "min_max_quant")
        if kind in ("min_max_quant", "quant", "quantized"):
            bits = est.pop("quant_bit", 4)
            if bits not in (4, 8) or isinstance(bits, bool):
                _fail("weight_estimator.quant_bit", bits, "must be 4 or 8")
            out["estimator"] = {"type": f"int{bits}"}
            _no_more_keys(est, "weight_estimator", kind, ("quant_bit",))
        elif kind in ("exact", "full", "none"):
            out["estimator"] = {"type": "exact"}
            _no_more_keys(est, "weight_estimator", kind, ())
        elif kind == "max_quant":
            _fail("weight_estimator.type", kind, "max_quant (symmetric max quantization) is not supported; "
                  "use min_max_quant (quant_bit 4 or 8) or none")
        else:
            _fail("weight_estimator.type", kind, "must be min_max_quant or none (exact)")

    pr = _legacy_section(data, "weight_pruner")
    if pr is not None:
        kind = pr.pop("type", "top_p")
        if kind == "top_p":  # the original code reads top-p's p from the key "threshold"
            name, p = _take(pr, "weight_pruner", "threshold", "top_p", "p")
            p = 0.85 if p is _MISSING else _renamed(f"weight_pruner.{name}", _check_unit_interval, "pruner.p", p)
            out["pruner"] = {"type": "top_p", "p": p}
        elif kind == "threshold":
            _, t = _take(pr, "weight_pruner", "threshold")
            t = 1e-3 if t is _MISSING else _check_unit_interval("weight_pruner.threshold", t)
            out["pruner"] = {"type": "threshold", "threshold": t}
        elif kind == "top_k":
            name, k = _take(pr, "weight_pruner", "top_k", "k")
            k = 256 if k is _MISSING else _renamed(f"weight_pruner.{name}", _check_int, "pruner.k", k, 1)
            out["pruner"] = {"type": "top_k", "k": k}
        elif kind in ("none", "null"):
            out["pruner"] = {"type": "none"}
        else:
            _fail("weight_pruner.type", kind, "must be top_p, top_k, threshold or none")
        _no_more_keys(pr, "weight_pruner", kind, {"top_p": ("threshold", "top_p", "p"), "threshold": ("threshold",),
                                                  "top_k": ("top_k", "k")}.get(kind, ()))
    else:
        out["pruner"] = {"type": "none"}

    skip = data.get("skip_first_two_layers", True)  # the original code's default (its enable_sparse_attention)
    if not isinstance(skip, bool):
        _fail("skip_first_two_layers", skip, "must be true or false")
    out["dense_layers"] = [0, 1] if skip else []
    for key in ("backend", "name"):
        if key in data:
            out[key] = data[key]
    return out


#: Every preset selects per kv-head (``gqa="group"``: one set per kv-head, shared by its query heads); the original
#: Twilight code's config files load with ``gqa="head"`` (see ``_from_legacy``).
PRESETS: dict[str, dict[str, Any]] = {
    # Full selector and no pruner: every decode step equals dense attention.
    "dense": {"selector": {"type": "full", "gqa": "group"}, "estimator": {"type": "exact"},
              "pruner": {"type": "none"}, "dense_layers": []},
    # Quest alone: a fixed budget of top pages, no pruning.
    "quest": {"selector": {"type": "quest", "token_budget": 8192, "page_size": 16, "gqa": "group"},
              "estimator": {"type": "exact"}, "pruner": {"type": "none"}, "dense_layers": [0, 1]},
    # Twilight over every token: int4 estimates, top-p 0.85.
    "twilight": {"selector": {"type": "full", "gqa": "group"}, "estimator": {"type": "int4"},
                 "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [0, 1]},
    # Quest as the coarse selector, then Twilight's pruning.
    "quest-twilight": {"selector": {"type": "quest", "token_budget": 8192, "page_size": 16, "gqa": "group"},
                       "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [0, 1]},
    # StreamingLLM: attention sinks plus a recent window.
    "streaming": {"selector": {"type": "streaming", "sink_tokens": 4, "window": 1024, "gqa": "group"},
                  "estimator": {"type": "exact"}, "pruner": {"type": "none"}, "dense_layers": [0, 1]},
}
