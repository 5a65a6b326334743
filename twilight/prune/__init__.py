"""Prune: keep the candidates that matter, per query head.

- ``top_p_mask(logits, p)``: the smallest set holding ``p`` of the softmax mass (default pruner).
- ``top_k_mask(logits, k)``: the ``k`` largest (ablation).
- ``threshold_mask(logits, t)``: normalised weight ``>= t`` (ablation).

All take unnormalised scores ``[..., N]`` with ``-inf`` marking non-candidates and return a bool mask
of the same shape. Every row with at least one candidate keeps at least one token.
"""
from __future__ import annotations

import torch

from twilight._checks import check_p
from twilight._compat import INDEX_DTYPE
from twilight.config import PRUNER_TYPES

__all__ = ["top_p_mask", "top_k_mask", "threshold_mask", "prune_mask", "exp_weights", "PRUNER_TYPES"]

# Radix digits of a non-negative float32's 31-bit pattern, most significant first, as (shift, width).
_RADIX_ROUNDS = ((20, 11), (10, 10), (0, 10))

# exp(z) is a subnormal float32 below this; such weights are flushed to 0 (their mass is < N * 1e-38), since
# arithmetic on subnormals is ~30x slower on x86 CPUs and a softmax over thousands of tokens makes many.
_EXP_FLUSH = -87.0


def exp_weights(logits: torch.Tensor) -> torch.Tensor:
    """``exp(logits - rowmax)`` in float32: in ``[0, 1]``, 0 for ``-inf``, all 0 for an empty row.

    Weights that would be subnormal (``logits - rowmax < -87``) are flushed to 0: softmax numerators without
    the ~30x slowdown subnormal arithmetic costs on x86 CPUs.
    """
    x = logits.float()
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = x - m
    return torch.exp(z.masked_fill_(z < _EXP_FLUSH, float("-inf")))


def top_p_mask(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Smallest set of each row whose softmax mass reaches ``p``, found without sorting.

    Args:
        logits: ``[..., N]`` unnormalised scores; ``-inf`` marks a non-candidate.
        p: a float in ``(0, 1]`` or a tensor of shape ``logits.shape[:-1]`` (one ``p`` per row).

    Returns:
        ``[..., N]`` bool mask: every element whose weight is at least the threshold weight ``w*``,
        where ``w*`` is the largest weight such that the elements ``>= w*`` hold at least ``p`` of the
        row's mass. Ties at the threshold are all kept; ``p = 1`` keeps every candidate.

    The threshold is found by a radix search over the bit pattern of the float32 weights ``exp(x - max)``
    (whose integer view is monotone because they are non-negative): three rounds, each a 1024- or
    2048-way search for the next 10 or 11 bits of ``w*`` using a per-row histogram of mass by digit. It is
    the binary search of top-p sampling kernels, 10 bits per round instead of 1, and it ends on the exact
    threshold weight. Only the first round reads whole rows; later rounds read the few elements that
    share the threshold's leading bits.

    Example::

        >>> top_p_mask(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.8)
        tensor([[ True,  True, False, False]])
    """
    check_p(p)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if isinstance(p, torch.Tensor):
        p = p.to(device=logits.device, dtype=torch.float32)
        if p.dim() and p.shape != logits.shape[:-1]:
            raise ValueError(f"per-row p must have shape {tuple(logits.shape[:-1])}, got {tuple(p.shape)}")
    elif float(p) >= 1.0:
        return logits > float("-inf")
    lead, n = logits.shape[:-1], logits.shape[-1]
    w = exp_weights(logits).reshape(-1, n)  # [R, N]
    rows = w.shape[0]
    target = (p.reshape(-1) if isinstance(p, torch.Tensor) and p.dim() else torch.as_tensor(p)) * w.sum(-1)
    bits = w.view(torch.int32)

    # Round 0 over the whole row: the top bits (sign, exponent and the leading mantissa bits).
    # (All index arithmetic stays in int32: int64 copies of [R, N] tensors cost more than the search.)
    shift, width = _RADIX_ROUNDS[0]
    bins = (1 << width) + 1
    row_base = torch.arange(rows, dtype=torch.int32, device=w.device).unsqueeze(-1) * bins
    hist = torch.zeros(rows * bins, dtype=torch.float32, device=w.device)
    hist.index_add_(0, ((bits >> shift) + row_base).view(-1), w.view(-1))
    prefix, mass_above = _radix_round(hist.view(rows, bins), torch.zeros_like(target), target)
    # Later rounds only look at the elements whose top bits equal the prefix found so far: compact them.
    flat = ((bits >> shift) == prefix.unsqueeze(-1)).view(-1).nonzero().squeeze(-1)
    row_of = (flat // n).to(torch.int32)
    cand_bits, cand_w = bits.view(-1)[flat], w.view(-1)[flat]
    for shift, width in _RADIX_ROUNDS[1:]:
        bins = (1 << width) + 1
        active = (cand_bits >> (shift + width)) == prefix[row_of]
        digit = torch.where(active, (cand_bits >> shift) & ((1 << width) - 1), 1 << width)
        hist = torch.zeros(rows * bins, dtype=torch.float32, device=w.device)
        hist.index_add_(0, row_of * bins + digit, cand_w)
        digit_star, mass_above = _radix_round(hist.view(rows, bins), mass_above, target)
        prefix = (prefix << width) | digit_star
    # prefix is now the exact bit pattern of the threshold weight (>= 1: zero weights are never kept)
    mask = bits >= prefix.clamp_min(1).unsqueeze(-1)
    if isinstance(p, torch.Tensor):  # rows with p == 1 keep every candidate, underflowed ones included
        mask |= (p.reshape(-1, 1) >= 1.0) & (logits.reshape(-1, n) > float("-inf"))
    return mask.reshape(*lead, n)


def _radix_round(hist: torch.Tensor, mass_above: torch.Tensor, target: torch.Tensor):
    """One round of the radix search.

    ``hist [R, bins + 1]`` holds the mass of the competing elements by digit (last column: elements not
    competing). Returns the largest digit ``d*`` with ``mass_above + mass(digits >= d*) >= target``, and
    the mass above the new, narrower range (``mass_above + mass(digits > d*)``).
    """
    bins = hist.shape[-1] - 1
    hist[:, bins] = 0.0
    suffix = hist.flip(-1).cumsum(-1).flip(-1)  # suffix[:, d] = mass of digits >= d; suffix[:, bins] = 0
    reaches = (mass_above.unsqueeze(-1) + suffix[:, :bins]) >= target.unsqueeze(-1)  # true for d <= d*
    digit_star = (reaches.sum(-1, dtype=torch.int32) - 1).clamp_min(0)
    above = suffix.gather(-1, (digit_star + 1).to(INDEX_DTYPE).unsqueeze(-1)).squeeze(-1)
    return digit_star, mass_above + above


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring candidates of each row (all of them when fewer than ``k``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is invalid: must be an integer >= 1")
    n = logits.shape[-1]
    finite = logits > float("-inf")
    if k >= n:
        return finite
    idx = torch.topk(logits, k, dim=-1).indices
    mask = torch.zeros_like(finite).scatter_(-1, idx, True)
    return mask & finite


def threshold_mask(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Candidates whose softmax weight is ``>= threshold`` (the row's best is always kept)."""
    check_p(threshold, "threshold")
    w = exp_weights(logits)
    probs = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return ((probs >= threshold) | (w >= 1.0)) & (logits > float("-inf"))


def prune_mask(logits: torch.Tensor, cfg) -> torch.Tensor:
    """Dispatch on a ``PrunerConfig``."""
    if cfg.type == "top_p":
        return top_p_mask(logits, cfg.p)
    if cfg.type == "top_k":
        return top_k_mask(logits, cfg.k)
    if cfg.type == "threshold":
        return threshold_mask(logits, cfg.threshold)
    if cfg.type == "none":
        return logits > float("-inf")
    raise ValueError(f"pruner.type={cfg.type!r} is invalid: must be one of {', '.join(PRUNER_TYPES)}")
