"""Tensor parallelism and multi-device models: each rank runs Twilight on its own heads.

A model loaded with ``tp_plan="auto"`` (or ``distributed_config=DistributedConfig(tp_size=N)``) under
``torchrun`` shards ``q_proj``/``k_proj``/``v_proj`` by heads: rank ``r`` computes a contiguous slice of the
query heads and the kv-heads of the same GQA groups, and its attention function sees only those (plain local
tensors). ``patch`` therefore sizes the pipeline from the *local* projection weights, not from the config;
each rank keeps its own ``TwilightCache`` and ``budget_stats`` over its own heads, and
``gather_stats`` joins them in rank order (every rank must call it: it is a collective;
``twilight.integrations.hf.gather_budget_stats(model)`` calls it with the model's own).

With a multi-device ``device_map`` every layer's ``LayerCache`` lives on that layer's device and the pipeline
resolves one backend per device.
"""
from __future__ import annotations

import torch

from twilight.integrations.hf.compat import tensor_parallel_group
from twilight.stats import BudgetStats

__all__ = ["local_head_counts", "gather_stats"]


def _local_rows(linear: torch.nn.Module) -> int | None:
    """Output rows this process holds of ``linear``'s weight (the local shard of a ``DTensor``)."""
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None  # e.g. a packed quantized weight: fall back to the config
    if hasattr(weight, "to_local"):  # torch.distributed.tensor.DTensor
        weight = weight.to_local()
    return weight.shape[0]


def local_head_counts(model, attention) -> tuple[int, int]:
    """``(num_q_heads, num_kv_heads)`` that this process's attention modules compute.

    The config's counts, unless tensor parallelism sharded the projections: then the local weights' rows
    divided by ``head_dim``. Raises ``ValueError`` when the shard does not hold whole heads or whole GQA groups.
    """
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    module = attention[0]
    head_dim = getattr(module, "head_dim", None)
    q_rows = _local_rows(getattr(module, "q_proj", None))
    k_rows = _local_rows(getattr(module, "k_proj", None))
    if not head_dim or q_rows is None or k_rows is None:
        return hq, hkv
    if q_rows % head_dim or k_rows % head_dim:
        raise ValueError(f"{type(module).__name__}: the local q_proj/k_proj rows ({q_rows}, {k_rows}) are not whole "
                         f"heads of head_dim={head_dim}")
    local_q, local_kv = q_rows // head_dim, k_rows // head_dim
    if local_kv == 0 or local_q % local_kv or local_q // local_kv != hq // hkv:
        raise ValueError(f"tensor parallelism split {hq} query / {hkv} kv heads into {local_q} / {local_kv} per "
                         "rank, which breaks GQA groups; choose a tp_size that divides the kv-head count")
    return local_q, local_kv


def gather_stats(model, local: BudgetStats) -> BudgetStats:
    """Budget stats over every head of a tensor-parallel ``model``, from each rank's ``local`` stats (its heads), in
    rank order.

    A collective: every rank calls it and gets the same result. For a model that is not sharded it returns
    ``local`` itself.
    """
    group = tensor_parallel_group(model)
    if group is None:
        return local
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)  # small: a few [H] tensors per layer
    return BudgetStats.concat_heads(parts)
