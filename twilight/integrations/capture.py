"""Record a Hugging Face model's post-RoPE queries, keys and values, e.g. to calibrate Double Sparsity.

::

    ids = tokenizer(text, return_tensors="pt").input_ids
    channels = twilight.integrations.capture.calibrate_double_sparse(model, ids, num_channels=16,
                                                                     path="ds_channels.json")
    twilight.patch(model, {"selector": {"type": "double_sparse", "channels_path": "ds_channels.json",
                                        "token_budget": 1024}, "estimator": "int4", "pruner": {"type": "top_p"}})

The recording goes through transformers' attention registry: for one forward pass the model's attention
implementation is swapped for a function that stores its inputs and then runs the original one, so the
outputs are unchanged. The model must not be patched by Twilight while recording.
"""
from __future__ import annotations

import os

import torch

__all__ = ["capture_qkv", "calibrate_double_sparse"]


def capture_qkv(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_query_only: bool = False, dtype: torch.dtype | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """One forward pass over ``input_ids [B, T]``; returns ``{layer: {"q", "k", "v"}}``.

    ``q``: ``[B, Hq, T, D]`` (``[B, Hq, D]`` of the last position with ``last_query_only``), ``k``/``v``:
    ``[B, Hkv, T, D]``, all after RoPE, as the attention function sees them; copied in ``dtype`` (default the
    model's).
    """
    from transformers import AttentionInterface

    from twilight.integrations.hf import check_supported, is_patched
    from twilight.integrations.hf.compat import attention_function

    if is_patched(model):
        raise ValueError("capture_qkv needs an unpatched model: call twilight.unpatch(model) first")
    check_supported(model)
    previous = model.config._attn_implementation or "eager"
    records: dict[int, dict[str, torch.Tensor]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        q = query[:, :, -1] if last_query_only else query
        records[module.layer_idx] = {name: t.detach().to(dtype or t.dtype).clone()
                                     for name, t in (("q", q), ("k", key), ("v", value))}
        return attention_function(previous, module)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("twilight_capture", record)
    model.set_attn_implementation("twilight_capture")
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device),
                  attention_mask=None if attention_mask is None else attention_mask.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return records


def calibrate_double_sparse(model, input_ids: torch.Tensor, num_channels: int = 16,
                            path: str | os.PathLike | None = None) -> dict[int, torch.Tensor]:
    """Double Sparsity's label channels of every layer, from the model's activations on ``input_ids``.

    Returns ``{layer: [Hkv, num_channels]}`` and, with ``path``, writes the JSON that
    ``selector.channels_path`` reads (see ``twilight.select.double_sparse.calibrate``).
    """
    from twilight.select.double_sparse import calibrate

    records = capture_qkv(model, input_ids)
    return calibrate({i: r["q"] for i, r in records.items()}, {i: r["k"] for i, r in records.items()},
                     num_channels=num_channels, path=path)
