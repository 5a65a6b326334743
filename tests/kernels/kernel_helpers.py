"""Shared helpers of the kernel tests: devices, cache/selection builders and float64 references."""
from __future__ import annotations

import os

import pytest
import torch

from twilight.cache import LayerCache
from twilight.quant import dequantize_int4
from twilight.selection import Selection

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def gpu_param(value="cuda", reason="needs a CUDA device"):
    return pytest.param(value, marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=reason)], id="cuda")


#: Devices the Triton kernels run on here: the CPU interpreter, and a GPU (compiled kernels) when present.
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1"),
                 id="interp"),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
                                pytest.mark.skipif(INTERPRET, reason="compiled Triton kernels: run without "
                                                                     "TRITON_INTERPRET")], id="cuda"),
]


# ---------------------------------------------------------------------------------------------- builders
def make_cache(batch=2, heads=2, head_dim=64, length=300, dtype=torch.float16, device="cpu", page_size=16,
               start=None, quant_bits=4, seed=0, key_scale=1.0):
    """A filled ``LayerCache`` (random K/V built on the CPU, so every device sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    cache = LayerCache(batch, heads, head_dim, dtype=dtype, device=device, page_size=page_size,
                       quant_bits=quant_bits, start=None if start is None else torch.tensor(start))
    k = (torch.randn(batch, heads, length, head_dim, generator=g) * key_scale).to(dtype)
    v = torch.randn(batch, heads, length, head_dim, generator=g).to(dtype)
    cache.append(k.to(device), v.to(device))
    return cache


def random_selection(cache: LayerCache, counts, width=None, seed=0, sort=False) -> Selection:
    """Distinct random valid positions per (b, h) row with the given ``counts [B][Hkv]``; padding slots hold
    arbitrary valid positions (not 0), as the Selection contract allows."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.int32)
    B, H = counts.shape
    width = width or max(int(counts.max()), 1)
    idx = torch.zeros(B, H, width, dtype=torch.int32)
    start = cache.start.cpu()
    for b in range(B):
        valid = torch.arange(int(start[b]), cache.length)
        for h in range(H):
            n = int(counts[b, h])
            assert n <= valid.numel()
            pick = valid[torch.randperm(valid.numel(), generator=g)[:n]]
            if sort:
                pick = pick.sort().values
            pad = valid[torch.randint(valid.numel(), (width - n,), generator=g)] if valid.numel() else torch.zeros(
                width - n, dtype=torch.long)
            idx[b, h] = torch.cat([pick, pad]).to(torch.int32)
    return Selection(idx.to(cache.device), counts.to(cache.device))


# ---------------------------------------------------------------------------------------------- references
def int4_reference(q: torch.Tensor, cache: LayerCache, sel: Selection) -> torch.Tensor:
    """float64 ``q·k`` against the dequantized int4 keys at the selected positions, ``-inf`` at padding."""
    keys = dequantize_int4(cache.k_int4.cpu(), cache.k_qparams.cpu(), cache.int4_block)  # whole tiles
    B, H, K = sel.indices.shape
    G = q.shape[1] // H
    idx = sel.indices.cpu().long()
    gathered = torch.gather(keys.double(), 2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    qg = q.cpu().double().view(B, H, G, -1)
    scores = torch.einsum("bhgd,bhkd->bhgk", qg, gathered)
    scores = scores.masked_fill(~sel.valid().cpu().unsqueeze(2), float("-inf"))
    return scores.reshape(B, H * G, K)


def quest_bound_reference(q: torch.Tensor, cache: LayerCache, q_dtype: torch.dtype | None = None) -> torch.Tensor:
    """float64 Quest page bounds ``[B, Hkv, P]`` from the cache's own page bounds (max over each kv-head's query
    heads of ``sum_d max(q_d max_d, q_d min_d)``), with ``q`` first rounded to ``q_dtype`` where a kernel does so;
    ``-inf`` for pages holding no valid token."""
    B, Hq, D = q.shape
    H, P = cache.num_kv_heads, cache.num_pages
    bounds = cache.page_bounds[:, :, :P].cpu().double()  # [B, H, P, 2, D]
    qg = (q.cpu() if q_dtype is None else q.cpu().to(q_dtype)).double().view(B, H, Hq // H, D)
    s = torch.einsum("bhgd,bhpd->bhpg", qg.clamp_min(0), bounds[:, :, :, 0]) + \
        torch.einsum("bhgd,bhpd->bhpg", qg.clamp_max(0), bounds[:, :, :, 1])
    s = s.amax(-1)
    # Each sequence's pages are cut from its first valid token: page p holds [p * ps + start % ps, + ps).
    start = cache.start.cpu().long().view(-1, 1)
    first = torch.arange(P).view(1, -1) * cache.page_size + start % cache.page_size  # [B, P]
    valid = (first + cache.page_size > start) & (first < cache.length)
    return s.masked_fill(~valid.unsqueeze(1), float("-inf"))


def page_bounds_reference(k: torch.Tensor, start, length: int, page_size: int):
    """Exact float32 page bounds ``(hi, lo)`` ``[B, H, ceil(length / page_size), D]`` of keys
    ``k [B, H, >=length, D]``, each sequence paged as it is alone: its valid keys ``[start[b], length)`` cut into
    runs of ``page_size`` from the first, run ``j`` stored as page ``start[b] // page_size + j``; pages holding no
    valid key are ``-inf`` / ``+inf``."""
    B, H, _, D = k.shape
    P = -(-length // page_size)
    hi = torch.full((B, H, P, D), float("-inf"))
    lo = torch.full((B, H, P, D), float("inf"))
    for b in range(B):
        s = int(start[b])
        for j, t in enumerate(range(s, length, page_size)):
            run = k[b, :, t:min(t + page_size, length)].float().cpu()
            hi[b, :, s // page_size + j], lo[b, :, s // page_size + j] = run.amax(1), run.amin(1)
    return hi, lo


def attention_reference(q: torch.Tensor, cache: LayerCache, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 softmax attention of ``q [B, Hq, D]`` over the cache's tokens in ``mask [B, Hkv, L]``."""
    B, Hq, D = q.shape
    H = cache.num_kv_heads
    G = Hq // H
    k = cache.keys().cpu().double().repeat_interleave(G, 1)
    v = cache.values().cpu().double().repeat_interleave(G, 1)
    m = mask.cpu().repeat_interleave(G, 1)
    logits = torch.einsum("bhd,bhld->bhl", q.cpu().double(), k) * scale
    probs = torch.softmax(logits.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhl,bhld->bhd", probs, v)


def top_p_sort_oracle(logits: torch.Tensor, p) -> torch.Tensor:
    """Sort-based top-p with the kernels' weights: ``w = exp(x - max)`` in float32, sorted descending, cumulative
    mass in float64; ``w*`` is the first sorted weight at which it reaches ``p`` of the total; keep every
    candidate with ``0 < w >= w*`` (ties kept), every finite one where ``p >= 1``, nothing in an empty row."""
    n = logits.shape[-1]
    x = logits.detach().cpu().float().reshape(-1, n)
    ps = (p.detach().cpu().double().reshape(-1).expand(x.shape[0]) if isinstance(p, torch.Tensor)
          else torch.full((x.shape[0],), float(p), dtype=torch.float64))
    m = x.amax(-1, keepdim=True)
    w = torch.exp(x - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    out = torch.zeros(x.shape, dtype=torch.bool)
    for r in range(x.shape[0]):
        finite = torch.isfinite(x[r])
        if ps[r] >= 1.0:
            out[r] = finite
            continue
        wr = w[r].double()
        total = float(wr.sum())
        if total == 0.0:
            continue
        desc = torch.sort(wr, descending=True).values
        cum = torch.cumsum(desc, 0)
        w_star = desc[min(int((cum < ps[r] * total).sum()), n - 1)]
        out[r] = (wr >= w_star) & (wr > 0)
    return out.reshape(logits.shape)


def long_top_p_rows(n: int, seed: int = 0) -> torch.Tensor:
    """Rows of ``n`` logits for the long-row paths: half ``-inf`` padding, no candidate, a single candidate,
    ties at the top, a tie group of 4000 straddling the cut-off (kept all or not at all), a plain random row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, n, generator=g) * 3
    x[0, n // 2:] = float("-inf")  # padding at the end, as candidate rows have
    x[1] = float("-inf")
    x[2, 1:] = float("-inf")
    x[3, :64] = 12.0  # ties at the top
    x[4] = torch.randn(n, generator=g) - 4.0
    x[4, :4000] = 2.0  # the tie group holds most of the mass: the threshold lands in it
    x[4, 4000:4003] = 6.0
    return x


def top_p_margins(logits: torch.Tensor, p) -> torch.Tensor:
    """Per row, the distance (in mass fraction, float64) between ``p`` and the nearest cumulative sum of the
    sorted probabilities: rows closer than float32 resolution may legitimately resolve either way."""
    n = logits.shape[-1]
    x = logits.detach().cpu().double().reshape(-1, n)
    ps = (p.detach().cpu().double().reshape(-1) if isinstance(p, torch.Tensor)
          else torch.full((x.shape[0],), float(p), dtype=torch.float64))
    probs = torch.softmax(x, -1).nan_to_num(0.0)
    cum = torch.cumsum(torch.sort(probs, -1, descending=True).values, -1)
    return (cum - ps.unsqueeze(-1)).abs().amin(-1)


def assert_top_p_guarantee(logits: torch.Tensor, p, mask: torch.Tensor, tol: float = 2e-5) -> None:
    """Row by row: kept mass >= p, closed upwards, minimal (dropping the least weight group goes below p);
    -inf never kept; a row with candidates keeps something; p >= 1 keeps every finite candidate."""
    n = logits.shape[-1]
    x = logits.detach().cpu().double().reshape(-1, n)
    mask = mask.detach().cpu().reshape(-1, n)
    ps = (p.detach().cpu().double().reshape(-1) if isinstance(p, torch.Tensor)
          else torch.full((x.shape[0],), float(p), dtype=torch.float64))
    for r in range(x.shape[0]):
        finite = torch.isfinite(x[r])
        assert not (mask[r] & ~finite).any(), f"row {r}: kept a -inf candidate"
        if not finite.any():
            assert not mask[r].any(), f"row {r}: kept something in an empty row"
            continue
        if ps[r] >= 1.0:
            assert torch.equal(mask[r], finite), f"row {r}: p = 1 must keep every finite candidate"
            continue
        probs = torch.softmax(x[r], 0)
        kept = probs[mask[r]]
        assert kept.numel() > 0, f"row {r}: nothing kept"
        assert float(kept.sum()) >= ps[r] - tol, f"row {r}: kept mass {float(kept.sum())} < p={float(ps[r])}"
        low = float(kept.min())
        dropped = probs[finite & ~mask[r]]
        if dropped.numel():
            assert float(dropped.max()) <= low * (1 + 1e-5), f"row {r}: dropped a likelier candidate"
        rest = float(probs[mask[r] & (probs > low * (1 + 1e-5))].sum())
        assert rest < ps[r] + tol, f"row {r}: not minimal ({rest} >= p without the least kept group)"


def assert_top_p_matches(logits: torch.Tensor, p, mask: torch.Tensor, reference: torch.Tensor,
                         margin: float = 1e-5) -> None:
    """``mask`` equals ``reference`` on every row whose p is not within float rounding of a cumulative mass
    boundary; every row satisfies the nucleus guarantees."""
    n = logits.shape[-1]
    diff = (mask.cpu() != reference.cpu()).reshape(-1, n).any(-1)
    if diff.any():
        close = top_p_margins(logits, p) < margin
        assert not (diff & ~close).any(), f"rows {diff.nonzero().flatten().tolist()} differ from the reference"
    assert_top_p_guarantee(logits, p, mask)


def tol_for(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """``|actual - expected| <= rtol * max(|expected|, 1)`` elementwise (finite entries), same ``-inf`` pattern."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    assert torch.equal(fa, fe), f"{what}: different -inf pattern"
    err = (a[fa] - e[fe]).abs()
    bound = rtol * e[fe].abs().clamp_min(1.0)
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {float(err.max()):.3g} exceeds the tolerance (x{worst:.2f})"


# Shared parameter cases of the int4 SpGEMV and fused-pruning kernels (every backend runs the same ones).
#: (dtype, head_dim, GQA group, candidate counts [B][Hkv], left padding [B])
INT4_SCORE_CASES = [
    (torch.float16, 64, 4, [[200, 0], [1, 77]], [0, 37]),  # empty and single-token rows, ragged batch
    (torch.bfloat16, 128, 1, [[64, 65], [130, 3]], [0, 0]),
    (torch.float16, 128, 8, [[5, 150], [100, 31]], [10, 0]),
    (torch.float32, 64, 4, [[129, 1], [0, 200]], [0, 90]),
]
#: (GQA group, candidate counts [B][Hkv], p)
PRUNE_CASES = [
    (4, [[50, 0], [1, 33]], 0.8),  # empty and single-candidate rows
    (1, [[64, 64], [10, 2]], 0.9),
    (8, [[17, 64], [40, 63]], 0.5),
]


def check_long_top_p_rows(top_p_mask, top_p_threshold, n: int, device) -> None:
    """A top-p kernel's mask and threshold on ``long_top_p_rows(n)``, against the torch reference and the sort-based
    oracle: -inf padding, empty and single-candidate rows, ties at the top and at the cut-off, p = 1, per-row p."""
    from twilight.prune import top_p_mask as torch_top_p_mask

    x = long_top_p_rows(n, seed=n)
    for p in (0.5, 0.9, 1.0, torch.tensor([0.3, 0.6, 0.99, 0.05, 0.8, 1.0])):
        mask = top_p_mask(x.to(device), p.to(device) if isinstance(p, torch.Tensor) else p)
        assert_top_p_matches(x, p, mask, torch_top_p_mask(x, p))
        assert_top_p_matches(x, p, mask, top_p_sort_oracle(x, p))
        kept = mask[4, :4000].cpu()
        assert bool(kept.all()) or not bool(kept.any()), "a tie group is kept whole or not at all"
    thr, _, kept = top_p_threshold(x.to(device), 0.7)
    assert torch.equal(kept.cpu(), top_p_sort_oracle(x, 0.7).sum(-1, dtype=torch.int32))
    assert int(thr[1]) == 0 and int(kept[1]) == 0, "a row without candidates keeps nothing"


def check_long_candidate_rows(prune_to_selection, device) -> None:
    """A fused top-p -> union -> compaction kernel on candidate rows of 9,000 (past the in-register / shared-memory
    limits) with per-head counts and garbage past them, against the torch reference and the sort-based oracle."""
    from twilight._tensors import compact
    from twilight.prune import top_p_mask as torch_top_p_mask

    B, Hkv, G, K = 1, 2, 2, 9000
    g = torch.Generator().manual_seed(11)
    idx = torch.stack([torch.randperm(20000, generator=g)[:K] for _ in range(Hkv)]).view(B, Hkv, K).int()
    sel = Selection(idx, torch.tensor([[9000, 8500]], dtype=torch.int32))
    scores = torch.randn(B, Hkv * G, K, generator=g) * 5
    scores = scores.masked_fill(~sel.valid().repeat_interleave(G, 1), 1e4)  # garbage past the counts: never read
    pruned, q_counts = prune_to_selection(scores.to(device), Selection(idx.to(device), sel.counts.to(device)),
                                          0.9, 0.5)
    logits = (scores * 0.5).masked_fill(~sel.valid().repeat_interleave(G, 1), float("-inf"))
    keep = torch_top_p_mask(logits, 0.9)
    ref_idx, ref_counts = compact(sel.indices, keep.view(B, Hkv, G, K).any(2))
    assert torch.equal(pruned.counts.cpu(), ref_counts)
    assert torch.equal(q_counts.cpu(), keep.sum(-1, dtype=torch.int32))
    for h in range(Hkv):
        n = int(ref_counts[0, h])
        assert torch.equal(pruned.indices[0, h, :n].cpu(), ref_idx[0, h, :n])
    assert_top_p_matches(logits, 0.9, keep, top_p_sort_oracle(logits, 0.9))
