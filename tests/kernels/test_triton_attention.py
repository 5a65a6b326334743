"""Triton sparse decode attention against float64 masked attention and the torch backend."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICES, assert_close, attention_reference, make_cache, random_selection, tol_for

from twilight.attention import sparse_decode_attention as torch_attention
from twilight.selection import Selection

attention = pytest.importorskip("twilight.kernels.triton.attention", reason="needs triton")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,D,G,counts,chunk", [
    (torch.float16, 64, 4, [[200, 0], [1, 129]], None),  # empty + single-token rows, one chunk per row
    (torch.bfloat16, 128, 1, [[200, 64], [65, 3]], 64),  # split rows merged (budgets 200 vs 3)
    (torch.float16, 128, 8, [[150, 1], [0, 97]], 64),
    (torch.float32, 64, 4, [[33, 200], [128, 129]], 64),
])
def test_sparse_attention(device, dtype, D, G, counts, chunk):
    cache = make_cache(2, 2, D, length=260, dtype=dtype, device=device, start=[0, 40])
    sel = random_selection(cache, counts, width=210, seed=2)
    q = torch.randn(2, 2 * G, D).to(dtype).to(device)
    scale = D ** -0.5
    out = attention.sparse_decode_attention(q, cache, sel, scale, chunk=chunk)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref = attention_reference(q, cache, sel.to_mask(cache.length), scale)
    assert_close(out, ref, 2 * tol_for(dtype), "attention vs float64")
    empty = (sel.counts.cpu() == 0).repeat_interleave(G, 1)
    assert bool((out.cpu()[empty] == 0).all()), "an empty selection attends to nothing: zeros"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_full_range_selection_matches_dense(device):
    """A dense layer's full-range selection (with left padding) through the sparse kernel."""
    cache = make_cache(2, 2, 64, length=300, dtype=torch.float16, device=device, start=[0, 123])
    sel = Selection.full(2, 2, cache.length, device=device, start=cache.start)
    q = torch.randn(2, 8, 64).half().to(device)
    out = attention.sparse_decode_attention(q, cache, sel, 0.125)
    ref = attention_reference(q, cache, sel.to_mask(cache.length), 0.125)
    assert_close(out, ref, 2 * tol_for(torch.float16), "full range")
    if device == "cpu":
        assert_close(out, torch_attention(q, cache, sel, 0.125), 2 * tol_for(torch.float16), "vs torch backend")


def test_chunk_choice_and_errors():
    assert attention.choose_chunk(1) == 256 and attention.choose_chunk(8192) == 256
    assert attention.choose_chunk(32768) == 512 and attention.choose_chunk(131072) == 2048
    cache = make_cache(1, 2, 64, length=50)
    sel = Selection.full(1, 2, 50)
    with pytest.raises(ValueError, match="dtype"):
        attention.sparse_decode_attention(torch.randn(1, 4, 64), cache, sel, 0.1)
    with pytest.raises(ValueError, match="chunk"):
        attention.sparse_decode_attention(torch.randn(1, 4, 64).half(), cache, sel, 0.1, chunk=50)
