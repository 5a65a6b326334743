"""Input checks shared by the kernel wrappers: ``twilight._tensors``' shape checks plus the device, layout and
dtype checks a kernel launch needs. Every mistake is a ``ValueError`` that names the argument."""
from __future__ import annotations

import contextlib

import torch

from twilight import _tensors as checks
from twilight.cache import LayerCache
from twilight.quant import INT4_TILE
from twilight.selection import Selection


def check_q(q: torch.Tensor, cache: LayerCache) -> int:
    """``q [B, Hq, D]`` matching ``cache``, on its device; returns the GQA group size ``G = Hq // Hkv``."""
    G = checks.check_q(q, cache)
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")
    return G


def check_selection(sel: Selection, cache: LayerCache) -> None:
    """``sel [B, Hkv, K]`` matching ``cache``, on its device."""
    checks.check_selection(sel, cache)
    if sel.indices.device != cache.device or sel.counts.device != cache.device:
        raise ValueError(f"selection is on {sel.indices.device} but the cache is on {cache.device}")


def check_group_selection(sel: Selection, kernel: str) -> None:
    """Refuse a per-query-head selection (``Selection.head_mask``, ``selector.gqa="head"``) in a kernel that lets every
    query head of a kv-head attend to (or keep) the whole row: it would run the other GQA semantics."""
    if sel.head_mask is not None:
        raise ValueError(f"{kernel} implements selector.gqa='group' only (every query head of a kv-head shares its "
                         "row), but this selection has a head_mask (selector.gqa='head', each query head its own "
                         "tokens): run this stage with twilight.kernels.reference.TorchBackend (the backends do)")


def check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)})")


def rows_p(p, rows_shape: tuple, device: torch.device) -> torch.Tensor:
    """``p`` (a float or a tensor of shape ``rows_shape``) as a contiguous float32 tensor ``[prod(rows_shape)]``,
    validated like ``twilight.prune.top_p_mask`` does (a tensor's values too: a host read)."""
    checks.check_p(p)
    p = kernel_p(p, rows_shape, device)
    if isinstance(p, torch.Tensor):
        return p
    n = 1
    for s in rows_shape:
        n *= s
    return torch.full((n,), p, dtype=torch.float32, device=device)


def check_int4_cache(cache: LayerCache) -> None:
    """A cache the int4 SpGEMV kernels can read: int4 keys in 64-token tiles, contiguous, up to date."""
    if cache.quant_bits != 4:
        raise ValueError("estimator.type='int4' needs a cache built with quant_bits=4")
    block = cache.int4_block
    if block != INT4_TILE:
        raise ValueError(f"the int4 kernels read {INT4_TILE}-token tiles; this cache packs int4_block={block}")
    check_contiguous(k_int4=cache.k_int4, k_qparams=cache.k_qparams)
    cache.update_derived()  # (a no-op unless the cache defers its derived structures)


def kernel_p(p, rows_shape: tuple, device: torch.device) -> float | torch.Tensor:
    """``p`` as a top-p kernel takes it, without reading the device: a float (checked to lie in ``(0, 1]``, passed
    as a scalar argument), or a float tensor of shape ``rows_shape`` (or a scalar tensor) as a contiguous float32
    ``[prod(rows_shape)]`` tensor. A tensor's values are not checked (that would be a host synchronisation): they
    must lie in ``(0, 1]``; the kernels keep every finite candidate where ``p >= 1``, and other values outside the
    range give unspecified (but in-bounds) masks."""
    if not isinstance(p, torch.Tensor):
        checks.check_p(p)
        return float(p)
    if not p.is_floating_point():
        raise ValueError(f"p must be a float tensor, got {p.dtype}")
    n = 1
    for s in rows_shape:
        n *= s
    p = p.to(device=device, dtype=torch.float32)
    if p.dim() == 0:
        return p.reshape(1).expand(n).contiguous()
    if tuple(p.shape) != tuple(rows_shape):
        raise ValueError(f"per-row p must have shape {tuple(rows_shape)}, got {tuple(p.shape)}")
    return p.reshape(n).contiguous()


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (a no-op for CPU tensors under the Triton interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def as_float_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., N]`` as float32 rows ``[R, N]`` with a unit last stride (a view when possible)."""
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    x = logits.reshape(-1, logits.shape[-1])
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return x


def check_prune_inputs(scores: torch.Tensor, sel: Selection) -> tuple[int, int, int, int, int]:
    """``scores [B, Hq, K]`` against candidates ``sel [B, Hkv, K]`` (no ``head_mask``: the fused union kernels keep
    every query head's choice for the whole group); returns ``(B, Hq, K, Hkv, G)``."""
    check_group_selection(sel, "the fused top-p + GQA union kernel (prune_to_selection)")
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, Hq, K], got shape {tuple(scores.shape)}")
    B, Hq, K = scores.shape
    Hkv = sel.indices.shape[1]
    if sel.indices.shape[0] != B or sel.indices.shape[2] != K or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"scores {tuple(scores.shape)} do not match the selection {tuple(sel.indices.shape)}: "
                         "need [B, Hq, K] with Hq a multiple of Hkv")
    if scores.device != sel.indices.device:
        raise ValueError(f"scores are on {scores.device} but the selection is on {sel.indices.device}")
    return B, Hq, K, Hkv, Hq // Hkv
