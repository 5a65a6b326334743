"""Triton int4 SpGEMV against float64 dot products with the dequantized keys, and the torch estimator."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import INT4_SCORE_CASES, TRITON_DEVICES, assert_close, int4_reference, make_cache, random_selection

from twilight.estimate import estimate_scores
from twilight.selection import Selection

spgemv = pytest.importorskip("twilight.kernels.triton.spgemv", reason="needs triton")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,D,G,counts,start", INT4_SCORE_CASES)
def test_int4_scores(device, dtype, D, G, counts, start):
    cache = make_cache(2, 2, D, length=290, dtype=dtype, device=device, start=start)
    sel = random_selection(cache, counts, width=210, seed=1)
    q = torch.randn(2, 2 * G, D).to(dtype).to(device)
    est = spgemv.int4_scores(q, cache, sel)
    assert est.shape == (2, 2 * G, 210) and est.dtype == torch.float32 and est.device == q.device
    # Exact codes times q (fp16/bf16 products are exact in fp32): only accumulation order differs.
    assert_close(est, int4_reference(q, cache, sel), 1e-4, "int4 SpGEMV vs float64")
    if device == "cpu":  # the torch estimator's CPU path rounds q and its output to bf16
        ref = estimate_scores(q, cache, sel, "int4")
        assert torch.equal(torch.isfinite(ref), torch.isfinite(est))
        finite = torch.isfinite(ref)
        if finite.any():
            assert (est[finite] - ref[finite]).abs().max() <= 2e-2 * ref[finite].abs().max()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_full_selection_and_whole_tiles(device):
    """A full-range selection over several 64-token tiles, both nibbles of every byte."""
    cache = make_cache(1, 2, 64, length=200, dtype=torch.float16, device=device)
    sel = Selection.full(1, 2, 200, device=device)
    q = torch.randn(1, 8, 64).half().to(device)
    assert_close(spgemv.int4_scores(q, cache, sel), int4_reference(q, cache, sel), 1e-4, "full selection")


def test_rejects_bad_inputs():
    cache = make_cache(1, 2, 64, length=50, quant_bits=8)
    sel = Selection.full(1, 2, 50)
    with pytest.raises(ValueError, match="quant_bits=4"):
        spgemv.int4_scores(torch.randn(1, 4, 64).half(), cache, sel)
    cache = make_cache(1, 2, 64, length=50)
    with pytest.raises(ValueError, match="selection must be"):
        spgemv.int4_scores(torch.randn(1, 4, 64).half(), cache, Selection.full(1, 3, 50))
