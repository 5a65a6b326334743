"""``double_sparse``: top tokens by ``q·k`` over calibrated label channels (Double Sparsity), and its label
channels: calibration from sample activations, saved as JSON, and loading.

Double Sparsity approximates ``q·k`` with a few *label* channels per head: the channels where
``|q_d · k_d|`` is largest on average. ``calibrate`` derives them from sample queries and keys of each
layer; the JSON it writes is what ``selector.channels_path`` points to::

    {"num_channels": 16,
     "layers": {"0": [[3, 17, ...], ...one list per kv-head, ascending], ...},
     "ranked": {"0": [[17, 3, ...], ...the same channels, most important first], ...}}

``load_channels`` also reads the channel files of the DoubleSparse code (and so the original Twilight
code's ``config_path``)::

    {"model.layers.0.self_attn.q_proj": [[39, 104, ...every channel, most important first], ...one per head],
     "model.layers.0.self_attn.k_proj": [...], ...}

from the projection named by ``selector.channels_key`` (``q``, ``k`` or ``qk``), taking the first
``num_channels`` of each row. Twilight keeps one set of label channels per kv-head, so the file must have one
row per kv-head: under GQA a ``q_proj``/``qk_proj`` entry has one row per query head and is refused (read
``k_proj`` instead, or calibrate per kv-head with ``twilight.integrations.capture.calibrate_double_sparse``).

Example::

    >>> import tempfile, os
    >>> q = {0: torch.randn(2, 4, 32, 64)}; k = {0: torch.randn(2, 2, 32, 64)}   # [B, H, T, D]
    >>> path = os.path.join(tempfile.mkdtemp(), "ch.json")
    >>> calibrate(q, k, num_channels=8, path=path)[0].shape
    torch.Size([2, 8])
    >>> load_channels(path, 0, 8).shape
    torch.Size([2, 8])
    >>> ds = os.path.join(tempfile.mkdtemp(), "ds.json")
    >>> rows = [[5, 1, 7, 0, 2, 3, 4, 6], [0, 6, 2, 1, 3, 4, 5, 7]]   # 2 kv-heads, head_dim 8
    >>> with open(ds, "w") as f:
    ...     json.dump({"model.layers.0.self_attn.k_proj": rows}, f)
    >>> load_channels(ds, 0, 3, channels_key="k").tolist()   # the first 3 of each row, ascending
    [[1, 5, 7], [0, 2, 6]]
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import torch

from twilight._tensors import group_queries
from twilight.cache import LayerCache, quantize_labels
from twilight.config import (
    _MISSING,
    CHANNELS_KEYS,
    MAX_LABEL_BITS,
    ConfigError,
    SelectorConfig,
    _check_int,
    _fail,
    _take,
)
from twilight.contract import StepPlan
from twilight.select.base import _group_or_heads, _masked, _topk_tokens
from twilight.select.registry import SelectorSpec, register_selector
from twilight.selection import Selection


def channel_importance(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean ``|q_d| * |k_d|`` per kv-head and channel: ``[Hkv, D]``.

    q: ``[B, Hq, T, D]``; k: ``[B, Hkv, T', D]`` (query heads are grouped onto their kv-head).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must be [B, Hq, T, D] and k [B, Hkv, T', D] with Hq a multiple of Hkv; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    hkv = k.shape[1]
    q_mag = q.float().abs().transpose(0, 1).reshape(hkv, -1, q.shape[-1]).mean(1)  # [Hkv, D]
    k_mag = k.float().abs().transpose(0, 1).reshape(hkv, -1, k.shape[-1]).mean(1)
    return q_mag * k_mag


def calibrate(queries: Mapping[int, torch.Tensor], keys: Mapping[int, torch.Tensor], num_channels: int = 16,
              path: str | os.PathLike | None = None) -> dict[int, torch.Tensor]:
    """Pick the ``num_channels`` most important channels per kv-head of every layer.

    Args:
        queries / keys: ``{layer_idx: [B, H, T, D]}`` sample activations (post-RoPE).
        path: if given, the JSON file to write (channels ascending under ``layers``, and by importance
            under ``ranked`` so that fewer channels can be loaded from it).
    Returns:
        ``{layer_idx: [Hkv, num_channels] int64}``, channels ascending.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels={num_channels} is invalid: must be >= 1")
    if set(queries) != set(keys):
        raise ValueError("queries and keys must cover the same layers")
    out, ranked = {}, {}
    for layer in sorted(queries):
        imp = channel_importance(queries[layer], keys[layer])
        if num_channels > imp.shape[-1]:
            raise ValueError(f"num_channels={num_channels} exceeds head_dim={imp.shape[-1]}")
        ranked[layer] = imp.topk(num_channels, dim=-1).indices  # most important first
        out[layer] = ranked[layer].sort(-1).values
    if path is not None:
        data = {"num_channels": num_channels, "layers": {str(layer): c.tolist() for layer, c in out.items()},
                "ranked": {str(layer): c.tolist() for layer, c in ranked.items()}}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        _read_version.cache_clear()  # a rewrite within the file system's timestamp resolution
    return out


def _read(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"selector.channels_path={path!r} does not exist")
    st = os.stat(path)
    return _read_version(path, st.st_mtime_ns, st.st_size)  # a rewritten file is read again


@functools.lru_cache(maxsize=None)
def _read_version(path: str, mtime_ns: int, size: int) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rows(value: Any, where: str) -> torch.Tensor:
    """A JSON list of equal-length lists of channel indices -> ``[rows, n]`` int64."""
    ok = isinstance(value, list) and value and all(isinstance(r, list) and r for r in value) \
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for r in value for c in r)
    if not ok or len({len(r) for r in value}) != 1:
        raise ValueError(f"{where} must be a non-empty list of equal-length lists of channel indices >= 0")
    return torch.tensor(value, dtype=torch.long)


def _first(rows: torch.Tensor, num_channels: int, where: str) -> torch.Tensor:
    """The first ``num_channels`` of each row (rows ranked by importance), ascending."""
    if num_channels > rows.shape[-1]:
        raise ValueError(f"selector.num_channels={num_channels} exceeds the {rows.shape[-1]} channels per head "
                         f"of {where}")
    ch = rows[:, :num_channels].sort(-1).values
    if bool((ch[:, 1:] == ch[:, :-1]).any()):
        raise ValueError(f"{where} repeats a channel within the first {num_channels} of a row")
    return ch


def _load_calibrated(data: dict, path: str, layer_idx: int, num_channels: int) -> torch.Tensor:
    layers = data["layers"]
    if not isinstance(layers, dict) or str(layer_idx) not in layers:
        have = sorted(layers, key=lambda x: (len(x), x)) if isinstance(layers, dict) else layers
        raise ValueError(f"{path} has no label channels for layer {layer_idx} (has {have})")
    rows = _rows(layers[str(layer_idx)], f"{path} layers[{str(layer_idx)!r}]")
    if num_channels > rows.shape[-1]:
        raise ValueError(f"selector.num_channels={num_channels} exceeds the {rows.shape[-1]} channels in {path}")
    if num_channels == rows.shape[-1]:
        return rows
    ranked = data.get("ranked")
    if not isinstance(ranked, dict) or str(layer_idx) not in ranked:
        raise ValueError(f"{path} lists {rows.shape[-1]} channels per head in ascending order without their "
                         f"ranking, so its {num_channels} most important are unknown: set selector.num_channels="
                         f"{rows.shape[-1]}, or recalibrate (calibrate now also writes the ranking)")
    return _first(_rows(ranked[str(layer_idx)], f"{path} ranked[{str(layer_idx)!r}]"), num_channels,
                  f"{path} ranked[{str(layer_idx)!r}]")


def _load_double_sparse(data: dict, path: str, layer_idx: int, num_channels: int, channels_key: str) -> torch.Tensor:
    prefix = f"model.layers.{layer_idx}.self_attn."
    name = f"{prefix}{channels_key}_proj"
    if name not in data:
        here = sorted(k for k in data if k.startswith(prefix))
        if here:
            raise ValueError(f"{path} has no {name!r} (selector.channels_key={channels_key!r}); "
                             f"for layer {layer_idx} it has {here}")
        have = sorted({int(k.split(".")[2]) for k in data if k.split(".")[2:3] and k.split(".")[2].isdigit()})
        raise ValueError(f"{path} has no label channels for layer {layer_idx} (has layers {have})")
    rows = _rows(data[name], f"{path} {name!r}")
    k_name = f"{prefix}k_proj"
    if channels_key != "k" and isinstance(data.get(k_name), list) and len(data[k_name]) != rows.shape[0]:
        raise ValueError(_per_query_head_message(path, name, rows.shape[0], len(data[k_name])))
    return _first(rows, num_channels, f"{path} {name!r}")


def _per_query_head_message(path: str, name: str, rows: int, num_kv_heads: int) -> str:
    return (f"{path} {name!r} has {rows} rows of channels (one per query head) but the model has {num_kv_heads} "
            "kv-heads; Twilight keeps one set of label channels per kv-head. Read the file's k_proj rows "
            "(selector.channels_key='k', the original config's selected_channel 'k') or calibrate per kv-head "
            "with twilight.integrations.capture.calibrate_double_sparse")


def load_channels(path: str | os.PathLike, layer_idx: int, num_channels: int, channels_key: str = "k",
                  num_kv_heads: int | None = None) -> torch.Tensor:
    """``[Hkv, num_channels]`` label channels of ``layer_idx``, ascending, from a channel file.

    Args:
        path: a ``calibrate`` JSON file or a DoubleSparse channel file (see the module docstring).
        num_channels: channels per head to use: the most important ones of the file.
        channels_key: ``q | k | qk``: the projection whose channels are read from a DoubleSparse file.
        num_kv_heads: if given, the file must have exactly one row per kv-head.
    """
    if channels_key not in CHANNELS_KEYS:
        raise ValueError(f"selector.channels_key={channels_key!r} is invalid: "
                         f"must be one of {', '.join(CHANNELS_KEYS)}")
    path = os.fspath(path)
    data = _read(path)
    if isinstance(data, dict) and "layers" in data:
        ch = _load_calibrated(data, path, layer_idx, num_channels)
        name = f"layers[{str(layer_idx)!r}]"
    elif isinstance(data, dict) and any(isinstance(k, str) and k.startswith("model.layers.") for k in data):
        ch = _load_double_sparse(data, path, layer_idx, num_channels, channels_key)
        name = f"model.layers.{layer_idx}.self_attn.{channels_key}_proj"
    else:
        raise ValueError(f"{path} is not a label-channel file: expected the JSON of "
                         "twilight.select.double_sparse.calibrate ({'num_channels': ..., 'layers': {...}}) or a "
                         "DoubleSparse channel file ({'model.layers.<i>.self_attn.<q|k>_proj': [[...], ...]})")
    if num_kv_heads is not None and ch.shape[0] != num_kv_heads:
        if ch.shape[0] > num_kv_heads and ch.shape[0] % num_kv_heads == 0:
            raise ValueError(_per_query_head_message(path, name, ch.shape[0], num_kv_heads))
        raise ValueError(f"{path} {name} has {ch.shape[0]} rows of channels but the model has {num_kv_heads} "
                         "kv-heads (one row per kv-head is needed): was it calibrated for another model?")
    return ch


class _DoubleSparse:
    def __init__(self, cfg: SelectorConfig, layer_idx: int):
        self.budget, self.label_bits, self.gqa = cfg.token_budget, cfg.label_bits, cfg.gqa
        self.channels = load_channels(cfg.channels_path, layer_idx, cfg.num_channels, cfg.channels_key)  # [Hkv, C]

    def __call__(self, q: torch.Tensor, cache: LayerCache, plan: StepPlan) -> Selection:
        if cache.label_channels is None:
            raise ValueError("double_sparse needs a cache built with label_channels (the calibrated channels)")
        qg = group_queries(q, cache)
        ch = cache.label_channels.to(q.device)
        q_label = torch.gather(qg, 3, ch.view(1, ch.shape[0], 1, -1).expand(qg.shape[0], -1, qg.shape[2], -1))
        k_label = cache.k_label[:, :, :cache.length]
        if cache.label_bits != self.label_bits:
            if cache.label_bits is not None:
                raise ValueError(f"selector.label_bits={self.label_bits} differs from the cache's "
                                 f"label_bits={cache.label_bits}")
            k_label = quantize_labels(k_label, self.label_bits)  # a cache that keeps exact labels
        scores = _group_or_heads(torch.einsum("bhgc,bhlc->bhgl", q_label.float(), k_label.float()), self.gqa)
        return _topk_tokens(_masked(scores, cache), cache, self.budget, plan)


def _check_fields(cfg: SelectorConfig) -> None:
    _check_int("selector.num_channels", cfg.num_channels, 1)
    if isinstance(cfg.channels_path, os.PathLike):
        cfg.channels_path = os.fspath(cfg.channels_path)
    if cfg.channels_path is not None and (not isinstance(cfg.channels_path, str) or not cfg.channels_path):
        _fail("selector.channels_path", cfg.channels_path, "must be a file path or null")
    if cfg.label_bits is not None:
        allowed = f"must be null (no quantization) or an integer in [1, {MAX_LABEL_BITS}]"
        if isinstance(cfg.label_bits, bool) or not isinstance(cfg.label_bits, int) \
                or not 1 <= cfg.label_bits <= MAX_LABEL_BITS:
            _fail("selector.label_bits", cfg.label_bits, allowed)
    if cfg.channels_key not in CHANNELS_KEYS:
        _fail("selector.channels_key", cfg.channels_key, f"must be one of {', '.join(CHANNELS_KEYS)}")


def _validate(cfg: SelectorConfig) -> None:
    if not cfg.channels_path:
        _fail("selector.channels_path", cfg.channels_path,
              "double_sparse needs the label-channel JSON written by twilight.select.double_sparse.calibrate "
              "(or a DoubleSparse channel file)")


def _from_legacy(sel: dict) -> None:
    """The original code's ``config_path``, ``r``, ``quant_bit`` (32: none) and ``selected_channel``."""
    name, path = _take(sel, "selector", "channels_path", "config_path")
    if path is not _MISSING:
        if not isinstance(path, str) or not path:
            _fail(f"selector.{name}", path, "must be the path of a channel file (maps to selector.channels_path)")
        sel["channels_path"] = path
    name, r = _take(sel, "selector", "num_channels", "r")
    if r is not _MISSING:
        sel["num_channels"] = _check_int(f"selector.{name}", r, 1)
    if "quant_bit" in sel:
        bits = sel.pop("quant_bit")
        if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= MAX_LABEL_BITS or bits == 32):
            _fail("selector.quant_bit", bits, f"must be an integer in [1, {MAX_LABEL_BITS}] or 32 (no "
                  "quantization of the label keys); it maps to selector.label_bits")
        if "label_bits" in sel and sel["label_bits"] != (None if bits == 32 else bits):
            raise ConfigError(f"selector.quant_bit={bits!r} and selector.label_bits={sel['label_bits']!r} "
                              "disagree: they name the same setting; give one")
        sel["label_bits"] = None if bits == 32 else bits
    if "selected_channel" in sel:
        key = sel.pop("selected_channel")
        if key not in CHANNELS_KEYS:
            _fail("selector.selected_channel", key,
                  f"must be one of {', '.join(CHANNELS_KEYS)}; it maps to selector.channels_key")
        if sel.setdefault("channels_key", key) != key:
            raise ConfigError(f"selector.selected_channel={key!r} and selector.channels_key="
                              f"{sel['channels_key']!r} disagree: they name the same setting; give one")


def _cache_needs(cfg: SelectorConfig, layer_idx: int, num_kv_heads: int | None) -> dict:
    """The label channels ``[Hkv, num_channels]`` of ``layer_idx`` (one row per kv-head when ``num_kv_heads`` is
    given) and the bits they are quantized to."""
    channels = load_channels(cfg.channels_path, layer_idx, cfg.num_channels, cfg.channels_key, num_kv_heads)
    return {"label_channels": channels, "label_bits": cfg.label_bits}


register_selector(SelectorSpec(
    name="double_sparse", build=lambda cfg, layer_idx=0, num_layers=None: _DoubleSparse(cfg, layer_idx),
    picks="top tokens by `q·k` over calibrated label channels (Double Sparsity)", gqa="both",
    fields=("channels_path", "num_channels", "label_bits", "channels_key"), check_fields=_check_fields,
    validate=_validate, legacy_names=("ds", "double_sparsity"), from_legacy=_from_legacy, cache_needs=_cache_needs))
