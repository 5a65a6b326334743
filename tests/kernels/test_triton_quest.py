"""Triton Quest: page bounds against the torch reference, top-page selection against torch.topk."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICES, assert_close, make_cache

from twilight.config import SelectorConfig
from twilight.select import make_selector
from twilight.select import quest_page_scores as torch_quest_page_scores

quest = pytest.importorskip("twilight.kernels.triton.quest", reason="needs triton")


def _bound_reference(q, cache):
    """float64 page bounds from the cache's (bf16/fp16) bounds and q rounded to their dtype."""
    B, Hq, D = q.shape
    H, P = cache.num_kv_heads, cache.num_pages
    bounds = cache.page_bounds[:, :, :P].cpu().double()  # [B, H, P, 2, D]
    qg = q.cpu().to(cache.bounds_dtype).double().view(B, H, Hq // H, D)
    s = torch.einsum("bhgd,bhpd->bhpg", qg.clamp_min(0), bounds[:, :, :, 0]) + \
        torch.einsum("bhgd,bhpd->bhpg", qg.clamp_max(0), bounds[:, :, :, 1])
    s = s.amax(-1)
    page_start = torch.arange(P) * cache.page_size
    valid = (page_start.view(1, -1) + cache.page_size > cache.start.cpu().view(-1, 1))
    return s.masked_fill(~valid.unsqueeze(1), float("-inf"))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,D,G,start", [
    (torch.float16, 64, 4, [0, 37]),
    (torch.bfloat16, 128, 1, [0, 0]),
    (torch.float32, 64, 8, [130, 5]),
])
def test_page_scores(device, dtype, D, G, start):
    cache = make_cache(2, 2, D, length=250, dtype=dtype, device=device, start=start)
    q = torch.randn(2, 2 * G, D).to(dtype).to(device)
    scores = quest.quest_page_scores(q, cache)
    assert scores.shape == (2, 2, cache.num_pages) and scores.dtype == torch.float32
    assert_close(scores, _bound_reference(q, cache), 1e-4, "page bounds vs float64")
    # The torch reference rounds its bf16/fp16 matmul result: agree within that rounding.
    assert_close(scores, torch_quest_page_scores(q, cache), 1e-2, "page bounds vs torch")


def _check_selection(sel, cache, scores, n_pages, budget):
    B, H = cache.batch, cache.num_kv_heads
    ps, L = cache.page_size, cache.length
    start = cache.start.cpu()
    idx, counts = sel.indices.cpu(), sel.counts.cpu()
    assert idx.shape == (B, H, n_pages * ps) and idx.dtype == torch.int32
    assert bool((idx >= 0).all()) and bool((idx < cache.capacity).all()), "padding must be valid positions"
    for b in range(B):
        valid_len = L - int(start[b])
        for h in range(H):
            got = idx[b, h, :counts[b, h]]
            assert got.unique().numel() == got.numel(), "tokens must be distinct"
            assert bool((got >= start[b]).all()) and bool((got < L).all()), "tokens must be valid positions"
            assert torch.equal(got, got.sort().values), "tokens come out in page order"
            s = scores[b, h].cpu()
            finite = torch.isfinite(s)
            if valid_len <= budget:
                want_pages = finite.nonzero().flatten()
            else:
                k = min(n_pages, int(finite.sum()))
                want_pages = torch.topk(s, k).indices
            want = torch.zeros(L, dtype=torch.bool)
            for p in want_pages.tolist():
                want[p * ps:(p + 1) * ps] = True
            want[:int(start[b])] = False
            assert torch.equal(got.long().sort().values, want.nonzero().flatten()), f"row ({b}, {h})"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,D,G,start,budget,page_size", [
    (torch.float16, 64, 4, [0, 37], 100, 16),  # ragged batch, budget not a multiple of the page size
    (torch.bfloat16, 128, 8, [0, 0], 64, 16),
    (torch.float16, 64, 1, [0, 180], 90, 8),  # the short sequence fits in the budget: all its tokens
])
def test_quest_select(device, dtype, D, G, start, budget, page_size):
    cache = make_cache(2, 2, D, length=260, dtype=dtype, device=device, start=start, page_size=page_size)
    q = torch.randn(2, 2 * G, D).to(dtype).to(device)
    sel = quest.quest_select(q, cache, budget, page_size)
    scores = quest.quest_page_scores(q, cache)
    n_pages = -(-budget // page_size)
    _check_selection(sel, cache, scores, n_pages, budget)
    # Same candidate set as the torch selector up to near-ties of its bf16-rounded page scores.
    ref_cache = cache if device == "cpu" else make_cache(2, 2, D, length=260, dtype=dtype, start=start,
                                                         page_size=page_size)
    ref = make_selector(SelectorConfig(type="quest", token_budget=budget, page_size=page_size))(q.cpu(), ref_cache)
    agree = (sel.to_mask(cache.length).cpu() == ref.to_mask(cache.length)).float().mean()
    assert agree > 0.9


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_budget_larger_than_context_is_full(device):
    cache = make_cache(2, 2, 64, length=100, dtype=torch.float16, device=device, start=[0, 30])
    q = torch.randn(2, 8, 64).half().to(device)
    sel = quest.quest_select(q, cache, 4096)
    assert sel.is_full_range
    assert sel.counts.cpu().tolist() == [[100, 100], [70, 70]]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_top_pages_in_small_blocks(device, monkeypatch):
    """Rows of pages longer than one block: the search and the expansion carry their state across blocks, ties
    spanning blocks included."""
    monkeypatch.setattr(quest, "_PAGE_BLOCK", 16)
    monkeypatch.setattr(quest, "_EXPAND_TOKENS", 64)  # 16 pages per expansion step
    cache = make_cache(1, 2, 64, length=700, dtype=torch.float16, device=device, start=[5])
    P = cache.num_pages  # 44
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(1, 2, P, generator=g)
    scores[0, 1, 10:40] = 0.25  # 30 tied pages across blocks; 12 pages above them
    scores[0, 1, :10] = 1.0 + torch.rand(10, generator=g)
    scores[0, 1, 40:] = 2.0 + torch.rand(4, generator=g)
    sel = quest.top_pages_to_tokens(scores.to(device), cache, n_pages=20)
    for h in range(2):
        got = sorted(set((sel.indices[0, h, :sel.counts[0, h]].cpu() // 16).tolist()))
        if h == 0:
            want = sorted(torch.topk(scores[0, h], 20).indices.tolist())
        else:  # 14 pages above the tie, then the 6 tied pages with the lowest indices
            want = sorted(list(range(0, 10)) + list(range(40, 44)) + list(range(10, 16)))
        assert got == want, f"head {h}"
        toks = sel.indices[0, h, :sel.counts[0, h]].cpu()
        assert torch.equal(toks, toks.sort().values) and int(toks.min()) >= 5


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_top_pages_ties_and_empty_pages(device):
    """Tied page scores go to the lower page index; -inf pages (left padding) are never taken."""
    cache = make_cache(1, 2, 64, length=128, dtype=torch.float16, device=device, start=[40])
    scores = torch.tensor([[[float("-inf"), float("-inf"), 1.0, 1.0, 1.0, 2.0, 0.5, 1.0],
                            [float("-inf"), float("-inf"), float("-inf"), 3.0, 3.0, 3.0, 3.0, 3.0]]],
                          device=device)
    sel = quest.top_pages_to_tokens(scores, cache, n_pages=3)
    got = [sorted(set((sel.indices[0, h, :sel.counts[0, h]].cpu() // 16).tolist())) for h in range(2)]
    assert got == [[2, 3, 5], [3, 4, 5]]
    assert sel.counts.cpu().tolist() == [[8 + 16 + 16, 48]]
    # Page 2 (tokens 32..47) is partly left padding: only 40..47 are taken.
    toks = sel.indices[0, 0, :40].cpu().tolist()
    assert toks[:8] == list(range(40, 48))


def test_rejects_bad_inputs():
    cache = make_cache(1, 2, 64, length=50)
    with pytest.raises(ValueError, match="page_size"):
        quest.quest_select(torch.randn(1, 4, 64).half(), cache, 32, page_size=8)
    with pytest.raises(ValueError, match="q must be"):
        quest.quest_page_scores(torch.randn(1, 3, 64).half(), cache)
    with pytest.raises(ValueError, match="token_budget"):
        quest.quest_select(torch.randn(1, 4, 64).half(), cache, 0)
