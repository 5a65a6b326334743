"""Triton top-p against ``twilight.prune.top_p_mask`` (exact up to float summation at mass ties), and the fused
top-p -> GQA union -> compacted Selection against the torch pipeline's mask + ``compact``."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    PRUNE_CASES,
    TRITON_DEVICES,
    assert_top_p_guarantee,
    assert_top_p_matches,
    check_long_candidate_rows,
    check_long_top_p_rows,
)

from twilight._tensors import compact
from twilight.prune import top_p_mask as torch_top_p_mask
from twilight.selection import Selection

top_p = pytest.importorskip("twilight.kernels.triton.top_p", reason="needs triton")


def _logits(rows, n, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * scale
    x[0, : n // 2] = float("-inf")  # half the candidates missing
    if rows > 1:
        x[1] = float("-inf")  # no candidate at all
    if rows > 2:
        x[2, 1:] = float("-inf")  # a single candidate
    if rows > 3 and n > 8:
        x[3, :8] = 5.0  # ties at the top
    return x


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("p", [0.3, 0.85, 1.0])
def test_top_p_mask(device, n, p):
    x = _logits(6, n, seed=n)
    mask = top_p.top_p_mask(x.to(device), p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert_top_p_matches(x, p, mask, torch_top_p_mask(x, p))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_per_row_p_scale_and_dtypes(device):
    x = _logits(8, 64, seed=3)
    p = torch.tensor([0.1, 0.5, 0.9, 1.0, 0.99, 0.7, 0.2, 1.0])
    mask = top_p.top_p_mask(x.to(device), p.to(device), scale=0.5)
    assert_top_p_matches(x * 0.5, p, mask, torch_top_p_mask(x * 0.5, p))
    for dtype in (torch.float16, torch.bfloat16):  # low-precision logits are read in float32
        xd = x.to(dtype)
        assert_top_p_matches(xd.float(), 0.8, top_p.top_p_mask(xd.to(device), 0.8), torch_top_p_mask(xd, 0.8))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_long_rows_are_streamed(device, monkeypatch):
    """Rows longer than the in-register limit take the chunked path; same result."""
    monkeypatch.setattr(top_p, "_MAX_SINGLE", 64)
    monkeypatch.setattr(top_p, "_CHUNK", 32)
    x = _logits(4, 250, seed=7)
    for p in (0.5, 0.95):
        assert_top_p_matches(x, p, top_p.top_p_mask(x.to(device), p), torch_top_p_mask(x, p))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n", [8193, 12289])
def test_long_rows_radix_search(device, n):
    """Rows past the in-register limit (the streamed radix search, 8 bits per pass) against the torch reference and
    a sort-based oracle: -inf padding, empty and single-candidate rows, ties at the top and at the cut-off, p = 1,
    per-row p."""
    assert n > top_p._MAX_SINGLE
    check_long_top_p_rows(top_p.top_p_mask, top_p.top_p_threshold, n, device)

def _pipeline_reference(scores, sel, p, scale):
    """What TwilightPipeline.prune does with the torch backend."""
    B, Hq, K = scores.shape
    Hkv = sel.indices.shape[1]
    logits = (scores * scale).masked_fill(~sel.valid().repeat_interleave(Hq // Hkv, 1), float("-inf"))
    keep = torch_top_p_mask(logits, p)
    indices, counts = compact(sel.indices, keep.view(B, Hkv, Hq // Hkv, K).any(2))
    return indices, counts, keep.sum(-1, dtype=torch.int32), logits, keep


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("G,counts,p", PRUNE_CASES)
def test_prune_to_selection(device, G, counts, p):
    B, Hkv, K = 2, 2, 64
    g = torch.Generator().manual_seed(G)
    idx = torch.stack([torch.randperm(500, generator=g)[:K] for _ in range(B * Hkv)]).view(B, Hkv, K).int()
    sel = Selection(idx, torch.tensor(counts, dtype=torch.int32))
    scores = torch.randn(B, Hkv * G, K, generator=g) * 4
    # Slots past a row's count hold garbage: prune_to_selection must not read them.
    scores = scores.masked_fill(~sel.valid().repeat_interleave(G, 1), 1e4)
    scale = 0.3
    pruned, q_counts = top_p.prune_to_selection(scores.to(device), Selection(idx.to(device), sel.counts.to(device)),
                                                p, scale=scale)
    ref_idx, ref_counts, ref_q_counts, logits, keep = _pipeline_reference(scores, sel, p, scale)
    assert pruned.indices.shape == (B, Hkv, K) and pruned.counts.dtype == torch.int32
    assert torch.equal(pruned.counts.cpu(), ref_counts) and torch.equal(q_counts.cpu(), ref_q_counts)
    for b in range(B):
        for h in range(Hkv):
            n = int(ref_counts[b, h])
            assert torch.equal(pruned.indices[b, h, :n].cpu(), ref_idx[b, h, :n]), "kept candidates in input order"
            pad = ref_idx[b, h, 0] if n else 0
            assert bool((pruned.indices[b, h, n:].cpu() == pad).all()), "padding repeats the first kept position"
    assert_top_p_guarantee(logits, p, keep)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_prune_to_selection_per_row_p(device):
    B, Hkv, G, K = 1, 2, 4, 40
    idx = torch.arange(K, dtype=torch.int32).expand(B, Hkv, K).contiguous()
    sel = Selection(idx, torch.tensor([[40, 25]], dtype=torch.int32))
    scores = torch.randn(B, Hkv * G, K) * 2
    p = torch.tensor([[0.2, 0.5, 1.0, 0.9, 0.3, 0.3, 0.6, 0.99]])
    pruned, q_counts = top_p.prune_to_selection(scores.to(device), Selection(idx.to(device), sel.counts.to(device)),
                                                p.to(device))
    ref_idx, ref_counts, ref_q_counts, _, _ = _pipeline_reference(scores, sel, p, 1.0)
    assert torch.equal(pruned.counts.cpu(), ref_counts) and torch.equal(q_counts.cpu(), ref_q_counts)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_prune_to_selection_long_candidate_rows(device):
    """Candidate rows longer than the in-register limit, with per-head counts (the streamed path with lengths)."""
    check_long_candidate_rows(top_p.prune_to_selection, device)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="p="):
        top_p.top_p_mask(torch.randn(2, 5), 0.0)
    with pytest.raises(ValueError, match="per-row p"):
        top_p.top_p_mask(torch.randn(2, 5), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="floating point"):
        top_p.top_p_mask(torch.ones(2, 5, dtype=torch.int32), 0.5)
    sel = Selection.full(1, 2, 10)
    with pytest.raises(ValueError, match="do not match"):
        top_p.prune_to_selection(torch.randn(1, 3, 10), sel, 0.5)
