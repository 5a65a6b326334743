"""`TwilightConfig`: which selector, estimator and pruner a patched model uses.

A config loads from a preset name, a JSON file, a dict (our schema or the original Twilight
code's) or another config, validates every field, and saves back to JSON::

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

SELECTOR_TYPES = ("full", "quest", "streaming", "double_sparse", "oracle_topk")
ESTIMATOR_TYPES = ("exact", "int8", "int4")
PRUNER_TYPES = ("none", "top_p", "top_k", "threshold")
BACKENDS = ("auto", "torch", "triton", "cuda", "flashinfer")


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

    type: one of ``full | quest | streaming | double_sparse | oracle_topk``.
    token_budget: candidates kept per kv-head (quest, double_sparse, oracle_topk).
    page_size: tokens per Quest page.
    sink_tokens / window: streaming's always-kept first tokens and recent window.
    channels_path: JSON written by ``twilight.select.double_sparse.calibrate`` (double_sparse).
    num_channels: label channels per head used by double_sparse.
    """

    type: str = "full"
    token_budget: int = 8192
    page_size: int = 16
    sink_tokens: int = 4
    window: int = 1024
    channels_path: str | None = None
    num_channels: int = 16

    def validate(self) -> None:
        if self.type not in SELECTOR_TYPES:
            _fail("selector.type", self.type, f"must be one of {', '.join(SELECTOR_TYPES)}")
        _check_int("selector.token_budget", self.token_budget, 1)
        _check_int("selector.page_size", self.page_size, 1)
        _check_int("selector.sink_tokens", self.sink_tokens, 0)
        _check_int("selector.window", self.window, 1)
        _check_int("selector.num_channels", self.num_channels, 1)
        if self.type == "double_sparse" and not self.channels_path:
            _fail("selector.channels_path", self.channels_path,
                  "double_sparse needs the label-channel JSON written by twilight.select.double_sparse.calibrate")


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
        return self

    @property
    def is_dense(self) -> bool:
        """True when every decode step attends to every token (full selector, no pruning)."""
        return self.selector.type == "full" and self.pruner.type == "none"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: "str | os.PathLike | Mapping[str, Any] | TwilightConfig") -> "TwilightConfig":
        """Build a config from a preset name, a JSON path, a dict or a config (copied)."""
        if isinstance(spec, TwilightConfig):
            return copy.deepcopy(spec).validate()
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)):
            text = os.fspath(spec)
            if text in PRESETS:
                return cls.from_dict(PRESETS[text], name=text)
            if text.endswith(".json") or os.path.exists(text):
                if not os.path.exists(text):
                    raise ConfigError(f"config file {text!r} does not exist")
                with open(text, encoding="utf-8") as f:
                    data = json.load(f)
                return cls.from_dict(data, name=os.path.splitext(os.path.basename(text))[0])
            raise ConfigError(f"config {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file")
        raise ConfigError(f"config must be a preset name, JSON path, dict or TwilightConfig, got {type(spec).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> "TwilightConfig":
        """Our schema, or the original Twilight code's (detected by its ``weight_estimator`` key)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        if "weight_estimator" in data or "weight_pruner" in data or "skip_first_two_layers" in data:
            data = _from_legacy(data)
        known = {"selector", "estimator", "pruner", "dense_layers", "backend", "name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; allowed keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for part, sub in (("selector", SelectorConfig), ("estimator", EstimatorConfig), ("pruner", PrunerConfig)):
            if part in data:
                kwargs[part] = _sub_from_dict(part, sub, data[part])
        if "dense_layers" in data:
            kwargs["dense_layers"] = data["dense_layers"]
        if "backend" in data:
            kwargs["backend"] = data["backend"]
        kwargs["name"] = name or data.get("name", "custom")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: "str | os.PathLike") -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes: Any) -> "TwilightConfig":
        """A validated copy with top-level fields replaced."""
        return dataclasses.replace(copy.deepcopy(self), **changes)


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


def _from_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the original Twilight code's config files.

    Those look like ``{"selector": {"type": "quest", "token_budget": 8192, "page_size": 16},
    "weight_estimator": {"type": "min_max_quant", "quant_bit": 4}, "weight_pruner": {"type": "top_p",
    "top_p": 0.85}, "skip_first_two_layers": true}``; selector names ``quest``/``full``/``streaming``/
    ``ds`` and ``threshold`` pruners with ``threshold`` are understood.
    """
    allowed = {"selector", "weight_estimator", "weight_pruner", "skip_first_two_layers", "backend", "name"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in an original-Twilight config; allowed keys: {sorted(allowed)}")
    out: dict[str, Any] = {}
    sel = dict(data.get("selector") or {"type": "full"})
    aliases = {"ds": "double_sparse", "double_sparsity": "double_sparse", "dense": "full", "none": "full",
               "oracle": "oracle_topk", "streamingllm": "streaming"}
    if "type" in sel:
        sel["type"] = aliases.get(sel["type"], sel["type"])
    if "budget" in sel:
        sel["token_budget"] = sel.pop("budget")
    out["selector"] = sel
    est = data.get("weight_estimator")
    if est:
        est = dict(est)
        kind = est.get("type", "min_max_quant")
        if kind in ("min_max_quant", "quant", "quantized"):
            bits = est.get("quant_bit", 4)
            if bits not in (4, 8):
                _fail("weight_estimator.quant_bit", bits, "must be 4 or 8")
            out["estimator"] = {"type": f"int{bits}"}
        elif kind in ("exact", "full", "none"):
            out["estimator"] = {"type": "exact"}
        else:
            _fail("weight_estimator.type", kind, "must be min_max_quant or exact")
    pr = data.get("weight_pruner")
    if pr:
        pr = dict(pr)
        kind = pr.get("type", "top_p")
        if kind == "top_p":
            out["pruner"] = {"type": "top_p", "p": pr.get("top_p", pr.get("p", 0.85))}
        elif kind == "threshold":
            out["pruner"] = {"type": "threshold", "threshold": pr.get("threshold", 1e-3)}
        elif kind == "top_k":
            out["pruner"] = {"type": "top_k", "k": pr.get("top_k", pr.get("k", 256))}
        elif kind in ("none", "null"):
            out["pruner"] = {"type": "none"}
        else:
            _fail("weight_pruner.type", kind, "must be top_p, top_k, threshold or none")
    else:
        out["pruner"] = {"type": "none"}
    out["dense_layers"] = [0, 1] if data.get("skip_first_two_layers", False) else []
    for key in ("backend", "name"):
        if key in data:
            out[key] = data[key]
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # Full selector and no pruner: every decode step equals dense attention.
    "dense": {"selector": {"type": "full"}, "estimator": {"type": "exact"}, "pruner": {"type": "none"},
              "dense_layers": []},
    # Quest alone: a fixed budget of top pages, no pruning.
    "quest": {"selector": {"type": "quest", "token_budget": 8192, "page_size": 16}, "estimator": {"type": "exact"},
              "pruner": {"type": "none"}, "dense_layers": [0, 1]},
    # Twilight over every token: int4 estimates, top-p 0.85.
    "twilight": {"selector": {"type": "full"}, "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85},
                 "dense_layers": [0, 1]},
    # Quest as the coarse selector, then Twilight's pruning.
    "quest-twilight": {"selector": {"type": "quest", "token_budget": 8192, "page_size": 16},
                       "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [0, 1]},
    # StreamingLLM: attention sinks plus a recent window.
    "streaming": {"selector": {"type": "streaming", "sink_tokens": 4, "window": 1024}, "estimator": {"type": "exact"},
                  "pruner": {"type": "none"}, "dense_layers": [0, 1]},
}
