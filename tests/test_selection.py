"""twilight.selection.Selection: mask/CSR converters, full(), validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight.selection import Selection

I32 = torch.int32


def _sel(indices, counts, **kw):
    return Selection(torch.tensor(indices, dtype=I32), torch.tensor(counts, dtype=I32), **kw)


def test_to_mask_ignores_padding():
    sel = _sel([[[3, 0, 7], [5, 5, 5]]], [[2, 1]])
    mask = sel.to_mask(8)
    assert mask.dtype == torch.bool and mask.shape == (1, 2, 8)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 3]
    assert mask[0, 1].nonzero().flatten().tolist() == [5]
    assert sel.k_max == 3


def test_valid():
    sel = _sel([[[1, 2, 3], [4, 5, 6]]], [[0, 3]])
    assert sel.valid().tolist() == [[[False, False, False], [True, True, True]]]


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), L=st.integers(1, 40), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_mask_round_trip(B, H, L, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, L, generator=g) < density
    sel = Selection.from_mask(mask)
    assert sel.indices.dtype == I32 and sel.counts.dtype == I32
    assert sel.counts.tolist() == mask.sum(-1).tolist()
    assert torch.equal(sel.to_mask(L), mask)
    # valid entries ascending and distinct, padding still in range
    for b in range(B):
        for h in range(H):
            row = sel.indices[b, h, :sel.counts[b, h]].tolist()
            assert row == sorted(set(row))
    assert int(sel.indices.min()) >= 0 and int(sel.indices.max()) < L
    # CSR: row pointers are the cumulative counts, column indices the selected positions in (b, h) order
    indptr, cols = sel.to_csr()
    assert indptr.dtype == I32 and cols.dtype == I32
    assert indptr.tolist() == [0] + torch.cumsum(mask.reshape(-1, L).sum(-1), 0).tolist()
    expected = [i for row in mask.reshape(-1, L) for i in row.nonzero().flatten().tolist()]
    assert cols.tolist() == expected


def test_to_csr_unsorted_rows_keep_order():
    sel = _sel([[[7, 2, 9], [4, 0, 0]], [[1, 1, 1], [8, 3, 5]]], [[3, 1], [0, 2]])
    indptr, cols = sel.to_csr()
    assert indptr.tolist() == [0, 3, 4, 4, 6]
    assert cols.tolist() == [7, 2, 9, 4, 8, 3]


def test_from_mask_empty():
    sel = Selection.from_mask(torch.zeros(2, 1, 5, dtype=torch.bool))
    assert sel.counts.tolist() == [[0], [0]] and sel.k_max >= 1
    assert not sel.to_mask(5).any()
    indptr, cols = sel.to_csr()
    assert indptr.tolist() == [0, 0, 0] and cols.numel() == 0


def test_full_without_start():
    sel = Selection.full(2, 3, 10)
    assert sel.is_full_range
    assert sel.indices.shape == (2, 3, 10) and sel.counts.tolist() == [[10] * 3] * 2
    assert sel.to_mask(10).all()
    assert sel.indices[1, 2].tolist() == list(range(10))


def test_full_with_start():
    start = torch.tensor([0, 3, 10, 12])
    L = 10
    sel = Selection.full(4, 2, L, start=start)
    assert sel.is_full_range
    assert sel.counts.tolist() == [[10, 10], [7, 7], [0, 0], [0, 0]]
    mask = sel.to_mask(L)
    pos = torch.arange(L)
    for b in range(4):
        assert torch.equal(mask[b], (pos >= start[b]).expand(2, L))
        # a full-range row is the contiguous range [start, start + count) in order
        c = int(sel.counts[b, 0])
        assert sel.indices[b, 0, :c].tolist() == list(range(int(start[b]), int(start[b]) + c))
    # padding entries are still valid positions
    assert int(sel.indices.min()) >= 0 and int(sel.indices.max()) <= L - 1


def test_validation_errors():
    with pytest.raises(ValueError, match="indices"):
        Selection(torch.zeros(2, 3, dtype=I32), torch.zeros(2, dtype=I32))
    with pytest.raises(ValueError, match="counts"):
        Selection(torch.zeros(1, 2, 3, dtype=I32), torch.zeros(2, 1, dtype=I32))
    with pytest.raises(ValueError, match="int32"):
        Selection(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(1, 2, dtype=I32))
    with pytest.raises(ValueError, match="int32"):
        Selection(torch.zeros(1, 2, 3, dtype=I32), torch.zeros(1, 2, dtype=torch.int64))
