"""Double Sparsity's label channels: calibration from sample activations, saved as JSON.

Double Sparsity approximates ``q·k`` with a few *label* channels per head: the channels where
``|q_d · k_d|`` is largest on average. ``calibrate`` derives them from sample queries and keys of each
layer; the JSON it writes is what ``selector.channels_path`` points to::

    {"num_channels": 16, "layers": {"0": [[3, 17, ...], ...one list per kv-head], ...}}

Example::

    >>> import tempfile, os
    >>> q = {0: torch.randn(2, 4, 32, 64)}; k = {0: torch.randn(2, 2, 32, 64)}   # [B, H, T, D]
    >>> path = os.path.join(tempfile.mkdtemp(), "ch.json")
    >>> calibrate(q, k, num_channels=8, path=path)[0].shape
    torch.Size([2, 8])
    >>> load_channels(path, 0, 8).shape
    torch.Size([2, 8])
"""
from __future__ import annotations

import functools
import json
import os
from typing import Mapping

import torch


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
        path: if given, the JSON file to write.
    Returns:
        ``{layer_idx: [Hkv, num_channels] int64}``, channels ascending.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels={num_channels} is invalid: must be >= 1")
    if set(queries) != set(keys):
        raise ValueError("queries and keys must cover the same layers")
    out = {}
    for layer in sorted(queries):
        imp = channel_importance(queries[layer], keys[layer])
        if num_channels > imp.shape[-1]:
            raise ValueError(f"num_channels={num_channels} exceeds head_dim={imp.shape[-1]}")
        out[layer] = imp.topk(num_channels, dim=-1).indices.sort(-1).values
    if path is not None:
        data = {"num_channels": num_channels, "layers": {str(l): c.tolist() for l, c in out.items()}}
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


def load_channels(path: str | os.PathLike, layer_idx: int, num_channels: int) -> torch.Tensor:
    """``[Hkv, num_channels]`` label channels of ``layer_idx`` from a ``calibrate`` JSON file."""
    data = _read(os.fspath(path))
    layers = data.get("layers", {})
    if str(layer_idx) not in layers:
        raise ValueError(f"{path} has no label channels for layer {layer_idx} (has {sorted(layers, key=int)})")
    ch = torch.tensor(layers[str(layer_idx)], dtype=torch.long)
    if ch.shape[-1] < num_channels:
        raise ValueError(f"selector.num_channels={num_channels} exceeds the {ch.shape[-1]} channels in {path}")
    return ch[:, :num_channels]
