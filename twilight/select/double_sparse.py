"""Double Sparsity's label channels: calibration from sample activations, saved as JSON, and loading.

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

from twilight.config import CHANNELS_KEYS


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
