"""Prune: keep the candidates that matter, per query head.

- ``top_p_mask(logits, p)``: the smallest set holding ``p`` of the softmax mass (default pruner).
- ``top_k_mask(logits, k)``: the ``k`` largest (ablation).
- ``threshold_mask(logits, t)``: normalised weight ``>= t`` (ablation).

All take unnormalised scores ``[..., N]`` with ``-inf`` marking non-candidates and return a bool mask
of the same shape. Every row with at least one candidate keeps at least one token.
"""
from __future__ import annotations

import torch

from twilight._compat import INDEX_DTYPE
from twilight._tensors import check_p, exp_weights
from twilight.config import PRUNER_TYPES

__all__ = ["top_p_mask", "top_p_kept", "top_k_mask", "threshold_mask", "prune_mask", "exp_weights", "PRUNER_TYPES"]

# Radix digits of a non-negative float32's 31-bit pattern, most significant first, as (shift, width).
_RADIX_ROUNDS = ((20, 11), (10, 10), (0, 10))

def top_p_mask(logits: torch.Tensor, p: float | torch.Tensor, host_reads: bool | None = None) -> torch.Tensor:
    """Smallest set of each row whose softmax mass reaches ``p``, found without sorting.

    Args:
        logits: ``[..., N]`` unnormalised scores; ``-inf`` marks a non-candidate.
        p: a float in ``(0, 1]`` or a tensor of shape ``logits.shape[:-1]`` (one ``p`` per row).
        host_reads: may the search read counts back to size its work (default: for CPU tensors)? Without,
            every shape is fixed by ``logits``' and no op waits for the device.

    Returns:
        ``[..., N]`` bool mask: every element whose weight is at least the threshold weight ``w*``,
        where ``w*`` is the largest weight such that the elements ``>= w*`` hold at least ``p`` of the
        row's mass. Ties at the threshold are all kept; ``p = 1`` keeps every candidate.

    The threshold is found by a radix search over the bit pattern of the float32 weights ``exp(x - max)``
    (whose integer view is monotone because they are non-negative): three rounds, each a 1024- or
    2048-way search for the next 10 or 11 bits of ``w*`` using a per-row histogram of mass by digit. It is
    the binary search of top-p sampling kernels, 10 bits per round instead of 1, and it ends on the exact
    threshold weight. With host reads, later rounds read only the few elements that share the threshold's
    leading bits, and on the CPU the search starts with a shortcut: the elements that can matter (weight at
    least ``(1 - p) * mass / N``: together, the lighter ones hold less than ``1 - p`` of the mass) are sorted,
    per row, and the threshold read off their cumulative sum; rows with too many such elements (flat ones)
    go through the radix search.

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
    if host_reads is None:
        host_reads = logits.device.type == "cpu"
    lead, n = logits.shape[:-1], logits.shape[-1]
    w = exp_weights(logits).reshape(-1, n)  # [R, N]
    rows = w.shape[0]
    p_rows = p.reshape(-1) if isinstance(p, torch.Tensor) and p.dim() else torch.as_tensor(p)
    target = p_rows * w.sum(-1)
    if host_reads and w.device.type == "cpu" and not isinstance(p, torch.Tensor) and rows:
        mask = _top_p_by_sorting_heavy(w, float(p), target)
        if mask is not None:
            return mask.reshape(*lead, n)
    bits = w.view(torch.int32)

    # Round 0 over the whole row: the top bits (sign, exponent and the leading mantissa bits).
    # (All index arithmetic stays in int32: int64 copies of [R, N] tensors cost more than the search.)
    shift, width = _RADIX_ROUNDS[0]
    bins = (1 << width) + 1
    row_base = torch.arange(rows, dtype=torch.int32, device=w.device).unsqueeze(-1) * bins
    hist = torch.zeros(rows * bins, dtype=torch.float32, device=w.device)
    hist.index_add_(0, ((bits >> shift) + row_base).view(-1), w.view(-1))
    prefix, mass_above = _radix_round(hist.view(rows, bins), torch.zeros_like(target), target)
    if host_reads:  # later rounds only look at the elements whose top bits equal the prefix found so far
        flat = ((bits >> shift) == prefix.unsqueeze(-1)).view(-1).nonzero().squeeze(-1)
        row_of = (flat // n).to(torch.int32)
        cand_bits, cand_w = bits.view(-1)[flat], w.view(-1)[flat]
    else:  # fixed shapes: every element competes, those off the prefix land in the spill bin
        row_of = (torch.arange(rows * n, device=w.device, dtype=torch.int32) // n)
        cand_bits, cand_w = bits.view(-1), w.view(-1)
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


# The sorting shortcut serves rows whose heavy elements (see top_p_mask) number at most this many on average.
_HEAVY_MAX_PER_ROW = 1024


def _heavy_threshold(w: torch.Tensor, p: float, target: torch.Tensor):
    """The sorting shortcut of ``top_p_mask`` on CPU weights ``w [R, N]`` (see there): the threshold weight
    ``w*`` is at least any cut below which the elements hold at most ``1 - p`` of the mass, so only the elements
    at or above such a cut are sorted.

    Returns ``(flat, row, vals, thr)``: the heavy elements' flat positions, rows and weights, sorted by row then
    weight descending, and each row's threshold weight ``[R]``; ``None`` when the rows hold too many heavy
    elements (flat rows: the radix search is faster) or a row has none.
    """
    R, N = w.shape
    light = (1.0 - p) * target / p  # the mass the dropped elements may hold, per row
    # Elements below `floor` hold less than `light` together (at most N of them). A 64x higher cut usually holds
    # less too (on peaked rows, where the mass sits in few elements): it is used on the rows where a sum checks it
    # (with a margin for the float sum), so far fewer elements are sorted.
    floor = light / N
    high = floor * 64
    below = torch.where(w < high.unsqueeze(-1), w, 0.0).sum(-1)
    cut = torch.where(below <= light * (1 - 1e-4), high, floor)
    heavy = w >= cut.unsqueeze(-1)
    flat = heavy.view(-1).nonzero().squeeze(-1)
    if flat.numel() > _HEAVY_MAX_PER_ROW * R:
        return None
    row = flat // N
    vals = w.view(-1).index_select(0, flat)
    # One sort for all rows: by row, then by weight descending (weights lie in [0, 1]).
    order = torch.sort(row.to(torch.float64) * 2.0 - vals.double()).indices
    flat, vals, row = flat.index_select(0, order), vals.index_select(0, order), row.index_select(0, order)
    csum = torch.cumsum(vals, 0, dtype=torch.float64)
    per_row = torch.bincount(row, minlength=R)
    row_base = torch.cumsum(per_row, 0) - per_row  # first slot of each row
    before = torch.where(row_base > 0, csum.index_select(0, (row_base - 1).clamp_min(0)), 0.0)  # earlier rows' mass
    short = (csum - before.index_select(0, row)) < target.double().index_select(0, row)  # still short of p
    reach = torch.zeros(R, dtype=torch.int64).index_add_(0, row, short.long())  # slots before the threshold
    if bool((reach >= per_row).any()):  # an empty row, or float rounding left one short: the radix search decides
        return None
    return flat, row, vals, vals.index_select(0, row_base + reach)


def _top_p_by_sorting_heavy(w: torch.Tensor, p: float, target: torch.Tensor) -> torch.Tensor | None:
    found = _heavy_threshold(w, p, target)
    if found is None:
        return None
    return (w >= found[3].unsqueeze(-1)) & (w > 0)


def top_p_kept(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``top_p_mask`` on CPU as coordinates: ``(row, col, counts)`` of the kept elements of ``logits [R, N]``
    (sorted by row) and the kept count of every row, without building the ``[R, N]`` mask.

    ``None`` when the sorting shortcut does not apply (flat rows, an empty row, a tensor ``p``, ``p = 1``):
    use ``top_p_mask`` then. Same semantics as ``top_p_mask`` (up to float summation order at a boundary).
    """
    if isinstance(p, torch.Tensor) or logits.device.type != "cpu" or logits.dim() != 2 or not 0 < p < 1:
        return None
    R, N = logits.shape
    w = torch.softmax(logits.float(), -1)  # one fused op; ordering and ties as exp(x - max); NaN rows: no heavy
    found = _heavy_threshold(w, p, p * w.sum(-1))
    if found is None:
        return None
    flat, row, vals, thr = found
    kept = vals >= thr.index_select(0, row)  # the heavy elements at or above their row's threshold
    row, col = row[kept], flat[kept] % N
    return row, col, torch.bincount(row, minlength=R)


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
