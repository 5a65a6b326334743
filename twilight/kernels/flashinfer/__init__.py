"""The ``flashinfer`` backend: FlashInfer's top-p kernel for pruning and its paged decode attention.

FlashInfer (``pip install 'twilight[gpu]'``, package ``flashinfer-python``) is imported lazily, on the first
construction of ``FlashInferBackend``. Stages FlashInfer has no kernel for come from the Triton backend when
Triton is installed (Quest scoring/selection, int4 estimation), else from torch.

- **prune**: ``flashinfer.sampling.top_p_renorm_probs(probs, top_p)`` zeroes every probability below the
  top-p threshold (it keeps ``probs > low`` with ``sum(probs > low) >= top_p``, ties included) and renormalises
  the rest; the kept set is its non-zero entries. ``probs`` is the softmax of the logits, so the set matches
  ``twilight.prune.top_p_mask`` up to float rounding at exact mass ties. ``p = 1`` keeps every finite candidate.
- **attend**: ``flashinfer.BatchDecodeWithPagedKVCacheWrapper`` with page size 1. Every (batch, kv-head) row
  of the `Selection` is one FlashInfer request with ``num_kv_heads=1`` and ``num_qo_heads=G`` (its GQA group);
  the cache's ``k``/``v`` ``[B, Hkv, cap, D]`` are viewed, without a copy, as ``B * Hkv * cap`` pages of one
  token (NHD layout ``[pages, 1, 1, D]``), and the page table is ``Selection.to_csr()`` offset by each row's
  first page. ``plan`` runs on every call (it reads the page table on the host).
"""
from __future__ import annotations

import torch

from twilight.kernels._validate import as_float_rows, check_group_selection, check_q, check_selection, rows_p
from twilight.kernels.reference import TorchBackend
from twilight.quant import INT4_TILE
from twilight.selection import Selection

__all__ = ["FlashInferBackend", "top_p_mask", "paged_decode_attention"]

_WORKSPACE_BYTES = 128 * 1024 * 1024


def _flashinfer():
    try:
        import flashinfer
    except ImportError as err:  # the backend registry turns this into a clear "unavailable" message
        raise ImportError(f"the flashinfer backend needs FlashInfer (pip install 'twilight[gpu]'): {err}") from err
    return flashinfer


def top_p_mask(logits: torch.Tensor, p) -> torch.Tensor:
    """Top-p mask of ``logits [..., N]`` from FlashInfer's ``top_p_renorm_probs``.

    Args:
        logits: ``[..., N]`` float on a CUDA device; ``-inf`` marks non-candidates.
        p: float in ``(0, 1]`` or a tensor of shape ``logits.shape[:-1]``.
    Returns:
        ``[..., N]`` bool: the candidates FlashInfer keeps.

    Example::

        >>> top_p_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device="cuda")), 0.8)
        tensor([[ True,  True, False, False]], device='cuda:0')
    """
    fi = _flashinfer()
    x = as_float_rows(logits)
    p_rows = rows_p(p, tuple(logits.shape[:-1]), x.device)
    finite = x > float("-inf")
    probs = torch.softmax(x, -1).nan_to_num_(0.0)  # a row without candidates: all zeros, keeps nothing
    if isinstance(p, torch.Tensor):
        top_p = p_rows.clamp(max=1.0)
    else:
        top_p = float(p)
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return finite.reshape(logits.shape)
    mask = fi.sampling.top_p_renorm_probs(probs.contiguous(), top_p) > 0
    mask |= (p_rows >= 1.0).unsqueeze(-1) & finite  # p = 1 keeps every finite candidate, underflowed ones too
    return mask.reshape(logits.shape)


class _DecodeWrappers:
    """One FlashInfer decode wrapper (and its workspace) per (device, tensor-core mode), reused across calls."""

    def __init__(self) -> None:
        self._wrappers: dict[tuple[torch.device, bool], object] = {}

    def get(self, device: torch.device, use_tensor_cores: bool):
        key = (device, use_tensor_cores)
        if key not in self._wrappers:
            fi = _flashinfer()
            workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self._wrappers[key] = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD",
                                                                        use_tensor_cores=use_tensor_cores)
        return self._wrappers[key]


_DEFAULT_WRAPPERS = _DecodeWrappers()


def paged_decode_attention(q: torch.Tensor, cache, sel: Selection, scale: float, wrappers: _DecodeWrappers | None = None
                           ) -> torch.Tensor:
    """Sparse decode attention with FlashInfer's paged decode kernel (page size 1, one request per kv-head row).

    Args:
        q: ``[B, Hq, D]`` fp16/bf16 on a CUDA device, the cache's dtype.
        cache: ``LayerCache`` with contiguous ``k``/``v`` ``[B, Hkv, cap, D]``.
        sel: ``Selection [B, Hkv, K_max]``.
        scale: softmax scale.
    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; rows with an empty selection are zeros.

    Example::

        >>> out = paged_decode_attention(q, cache, sel, q.shape[-1] ** -0.5)
    """
    G = check_q(q, cache)
    check_selection(sel, cache)
    check_group_selection(sel, "FlashInfer's paged decode attention")
    if q.dtype != cache.dtype:
        raise ValueError(f"q dtype {q.dtype} does not match the cache dtype {cache.dtype}")
    if not (cache.k.is_contiguous() and cache.v.is_contiguous()):
        raise ValueError("cache.k and cache.v must be contiguous to be viewed as FlashInfer pages")
    B, Hq, D = q.shape
    H, cap = cache.num_kv_heads, cache.capacity
    rows = B * H
    indptr, flat = sel.to_csr()  # [rows + 1], [nnz] int32 (one host sync for nnz)
    counts = sel.counts.reshape(-1)
    row_of = torch.repeat_interleave(torch.arange(rows, device=q.device), counts.long(), output_size=flat.numel())
    page_ids = (flat.long() + row_of * cap).to(torch.int32)  # page = (b * H + h) * cap + position
    last_page_len = (counts > 0).to(torch.int32)  # page size 1: a full last page, or none for an empty row
    k_pages = cache.k.view(rows * cap, 1, 1, D)  # NHD: [pages, page_size, num_kv_heads, head_dim]
    v_pages = cache.v.view(rows * cap, 1, 1, D)
    wrapper = (wrappers or _DEFAULT_WRAPPERS).get(q.device, use_tensor_cores=G >= 4)
    wrapper.plan(indptr, page_ids, last_page_len, G, 1, D, 1, q_data_type=q.dtype, kv_data_type=cache.dtype,
                 sm_scale=float(scale))
    out = wrapper.run(q.reshape(rows, G, D).contiguous(), (k_pages, v_pages))  # [rows, G, D]
    out = out.reshape(B, H, G, D).masked_fill((sel.counts == 0).view(B, H, 1, 1), 0.0)
    return out.reshape(B, Hq, D).to(q.dtype)


class FlashInferBackend(TorchBackend):
    """FlashInfer's top-p and paged decode attention; Quest and int4 estimation from Triton (else torch)."""

    name = "flashinfer"
    compile_devices = ()  # FlashInfer's planned wrappers are not traceable

    def __init__(self) -> None:
        _flashinfer()  # fail now (ImportError) if FlashInfer is missing
        self._wrappers = _DecodeWrappers()
        try:
            from twilight.kernels.triton import TritonBackend

            self._triton = TritonBackend()
        except ImportError:
            self._triton = None
        if self._triton is not None:  # Triton's fused Quest selection
            self.select_kernels = self._triton.select_kernels

    def quest_page_scores(self, q, cache):
        if self._triton is not None:
            return self._triton.quest_page_scores(q, cache)
        return super().quest_page_scores(q, cache)

    def int4_block(self, device) -> int:
        return INT4_TILE  # read by Triton's SpGEMV

    def estimate(self, q, cache, sel, kind, plan):
        if self._triton is not None and kind == "int4":
            return self._triton.estimate(q, cache, sel, kind, plan)
        return super().estimate(q, cache, sel, kind, plan)

    def prune_top_p(self, logits, p):
        return top_p_mask(logits, p)

    def attend(self, q, cache, sel, scale, plan):
        # FlashInfer's kernels are 16-bit, and share a row between a group's query heads (gqa="head": torch)
        if q.dtype not in (torch.float16, torch.bfloat16) or sel.head_mask is not None:
            return super().attend(q, cache, sel, scale, plan)
        return paged_decode_attention(q, cache, sel, scale, self._wrappers)
