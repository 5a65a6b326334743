"""The csrc/ CUDA kernels against the torch references: under the CPU emulation of the CUDA execution model
(csrc/cuda_emulation.h, built with the host compiler, the very same kernel source) and natively on a GPU."""
from __future__ import annotations

import shutil

import pytest
import torch
from kernel_helpers import (
    INT4_SCORE_CASES,
    PRUNE_CASES,
    assert_close,
    assert_top_p_guarantee,
    assert_top_p_matches,
    check_long_candidate_rows,
    check_long_top_p_rows,
    gpu_param,
    int4_reference,
    make_cache,
    random_selection,
    top_p_sort_oracle,
)

import twilight.kernels.cuda as cuda_kernels
from twilight._tensors import compact
from twilight.prune import top_p_mask as torch_top_p_mask
from twilight.selection import Selection

HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.fixture(scope="module", params=[
    pytest.param("emulated", marks=pytest.mark.skipif(not HAS_CXX, reason="needs a C++ compiler for the emulation")),
    gpu_param(),
])
def device(request):
    """The device the kernels' tensors live on: "cpu" (emulation, built once, ~40 s) or "cuda"."""
    if request.param == "emulated":
        cuda_kernels.load_emulated()
        cuda_kernels.enable_emulation(True)
        yield "cpu"
        cuda_kernels.enable_emulation(False)
    else:
        yield "cuda"


def _logits(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3
    x[0, : n // 2] = float("-inf")
    if rows > 1:
        x[1] = float("-inf")
    if rows > 2:
        x[2, 1:] = float("-inf")
    if rows > 3 and n > 8:
        x[3, :8] = 5.0
    return x


@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("p", [0.3, 0.85, 1.0])
def test_top_p_mask(device, n, p):
    x = _logits(6, n, seed=n)
    mask = cuda_kernels.top_p_mask(x.to(device), p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert_top_p_matches(x, p, mask, torch_top_p_mask(x, p))


def test_top_p_per_row_p_and_scale(device):
    x = _logits(8, 100, seed=3)
    p = torch.tensor([0.1, 0.5, 0.9, 1.0, 0.99, 0.7, 0.2, 1.0])
    mask = cuda_kernels.top_p_mask(x.to(device), p.to(device), scale=0.5)
    assert_top_p_matches(x * 0.5, p, mask, torch_top_p_mask(x * 0.5, p))
    thr, rowmax, kept = cuda_kernels.top_p_threshold(x.to(device), p.to(device), scale=0.5)
    assert torch.equal(kept.cpu(), mask.sum(-1, dtype=torch.int32).cpu())
    assert bool((thr.cpu()[p >= 1] == -1).all())


@pytest.mark.parametrize("n", [8192, 8193, 12289])
def test_top_p_long_rows(device, n):
    """Rows at and past the shared-memory cache (8192 weights; longer rows recompute the weights in each of the
    radix search's 4 passes) and past the old 12288 limit, against the torch reference and a sort-based oracle:
    -inf padding, empty and single-candidate rows, ties at the top and at the cut-off, p = 1, per-row p."""
    check_long_top_p_rows(cuda_kernels.top_p_mask, cuda_kernels.top_p_threshold, n, device)

def test_top_p_matches_sort_oracle(device):
    """Short rows (the cached path) against the sort-based oracle, many seeds and p values."""
    for seed in range(4):
        x = torch.randn(8, 257, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
        x[seed, 100:] = float("-inf")
        for p in (0.1, 0.5, 0.8, 0.95):
            assert_top_p_matches(x, p, cuda_kernels.top_p_mask(x.to(device), p), top_p_sort_oracle(x, p))


@pytest.mark.parametrize("dtype,D,G,counts,start", INT4_SCORE_CASES)
def test_int4_scores(device, dtype, D, G, counts, start):
    cache = make_cache(2, 2, D, length=290, dtype=dtype, device=device, start=start)
    sel = random_selection(cache, counts, width=210, seed=1)
    q = torch.randn(2, 2 * G, D).to(dtype).to(device)
    est = cuda_kernels.int4_scores(q, cache, sel)
    assert est.shape == (2, 2 * G, 210) and est.dtype == torch.float32 and est.device == q.device
    assert_close(est, int4_reference(q, cache, sel), 1e-4, "int4 SpGEMV vs float64")


@pytest.mark.parametrize("G,counts,p", PRUNE_CASES)
def test_prune_to_selection(device, G, counts, p):
    B, Hkv, K = 2, 2, 64
    g = torch.Generator().manual_seed(G)
    idx = torch.stack([torch.randperm(500, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).int()
    sel = Selection(idx, torch.tensor(counts, dtype=torch.int32))
    scores = torch.randn(B, Hkv * G, K, generator=g) * 4
    scores = scores.masked_fill(~sel.valid().repeat_interleave(G, 1), 1e4)  # garbage past the counts: never read
    scale = 0.3
    pruned, q_counts = cuda_kernels.prune_to_selection(scores.to(device),
                                                       Selection(idx.to(device), sel.counts.to(device)), p, scale)
    logits = (scores * scale).masked_fill(~sel.valid().repeat_interleave(G, 1), float("-inf"))
    keep = torch_top_p_mask(logits, p)
    ref_idx, ref_counts = compact(sel.indices, keep.view(B, Hkv, G, K).any(2))
    assert torch.equal(pruned.counts.cpu(), ref_counts)
    assert torch.equal(q_counts.cpu(), keep.sum(-1, dtype=torch.int32))
    for b in range(B):
        for h in range(Hkv):
            n = int(ref_counts[b, h])
            assert torch.equal(pruned.indices[b, h, :n].cpu(), ref_idx[b, h, :n])
            pad = ref_idx[b, h, 0] if n else 0
            assert bool((pruned.indices[b, h, n:].cpu() == pad).all()), "padding repeats the first kept position"
    assert_top_p_guarantee(logits, p, keep)


def test_prune_to_selection_long_candidate_rows(device):
    """Candidate rows past the shared-memory cache, with per-head counts (the uncached path with lengths)."""
    check_long_candidate_rows(cuda_kernels.prune_to_selection, device)


def test_cpu_tensors_need_emulation(monkeypatch):
    monkeypatch.setattr(cuda_kernels, "_EMULATION", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda_kernels.top_p_mask(torch.randn(2, 5), 0.5)
