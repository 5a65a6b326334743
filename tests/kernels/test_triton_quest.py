"""Triton Quest: page bounds against a float64 reference and the torch one; Quest's selection (the last page always,
the best others by page bound) against a float64 brute force of that definition and the torch selector; top-page
selection against torch.topk."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICES, assert_close, make_cache, quest_bound_reference

from twilight.config import SelectorConfig
from twilight.contract import StepPlan
from twilight.select import make_selector
from twilight.select import quest_page_scores as torch_quest_page_scores

quest = pytest.importorskip("twilight.kernels.triton.quest", reason="needs triton")


def _bound_reference(q, cache):
    """float64 page bounds from the cache's bounds and q as given (no backend rounds q to the bounds' dtype)."""
    return quest_bound_reference(q, cache)


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
    # The torch reference sums the same float32 products: agree up to the order of the sums.
    assert_close(scores, torch_quest_page_scores(q, cache), 1e-5, "page bounds vs torch")


def _quest_reference(q, cache, budget):
    """Brute force, float64, per (b, kv-head): Quest's page choice as ``quest_select`` defines it.

    ``n_pages = ceil(budget / page_size)`` pages: the last page always, and the ``n_pages - 1`` best other pages by
    the float64 page bound among those holding a valid token. Returns, per row, ``(sure, maybe, k, last)``: the
    pages that must be chosen (bound clearly above the cut-off), the pages within 1e-4 (relative) of the cut-off
    that may or may not be (near-ties the kernel's float32 sums may order either way), how many others to choose,
    and the last page.
    """
    B, H, P, ps = cache.batch, cache.num_kv_heads, cache.num_pages, cache.page_size
    bounds = _bound_reference(q, cache)  # [B, H, P] float64, -inf for pages without a valid token
    n_pages = min(-(-budget // ps), P)
    out = {}
    for b in range(B):
        last = _last_page(cache, b)
        for h in range(H):
            s = bounds[b, h].clone()
            s[last] = float("-inf")  # the last page is kept anyway: it does not compete
            others = torch.isfinite(s).nonzero().flatten()
            k = min(n_pages - 1, others.numel())
            if k == others.numel():
                out[b, h] = (set(others.tolist()), set(), k, last)
                continue
            if k == 0:
                out[b, h] = (set(), set(), 0, last)
                continue
            vals = s[others]
            cut = float(torch.sort(vals, descending=True).values[k - 1])
            tol = 1e-4 * max(abs(cut), 1e-6)
            sure = set(others[vals > cut + tol].tolist())
            maybe = set(others[(vals - cut).abs() <= tol].tolist())
            out[b, h] = (sure, maybe, k, last)
    return out


def _first(cache, b):
    """Where sequence b's page grid starts: its pages are cut from its first valid token."""
    return int(cache.start[b]) % cache.page_size


def _last_page(cache, b):
    return (cache.length - 1 - _first(cache, b)) // cache.page_size


def _valid_tokens(cache, b, page):
    ps, first = cache.page_size, _first(cache, b)
    return list(range(max(page * ps + first, int(cache.start[b])), min(page * ps + first + ps, cache.length)))


def _check_quest_selection(sel, q, cache, budget):
    """``sel`` (a ``quest_select`` result) against the float64 brute force: the same token set per (b, kv-head) up to
    near-ties, the other pages in page order then the last page, and valid positions in every padding slot."""
    B, H, ps, L = cache.batch, cache.num_kv_heads, cache.page_size, cache.length
    n_pages = min(-(-budget // ps), cache.num_pages)
    idx, counts = sel.indices.cpu(), sel.counts.cpu()
    assert idx.shape == (B, H, n_pages * ps) and idx.dtype == torch.int32 and counts.dtype == torch.int32
    ref = _quest_reference(q, cache, budget)
    for b in range(B):
        start = int(cache.start[b])
        for h in range(H):
            n = int(counts[b, h])
            got = idx[b, h, :n].tolist()
            assert len(set(got)) == n, f"row ({b}, {h}): tokens must be distinct"
            sure, maybe, k, last = ref[b, h]
            pages = sorted({(t - _first(cache, b)) // ps for t in got})
            others = [pg for pg in pages if pg != last]
            assert last in pages, f"row ({b}, {h}): the last page must always be kept"
            assert len(others) == k, f"row ({b}, {h}): {len(others)} other pages, expected {k}"
            assert sure <= set(others) <= sure | maybe, (
                f"row ({b}, {h}): pages {sorted(set(others) ^ sure)} differ from the reference beyond near-ties")
            want = [t for pg in others for t in _valid_tokens(cache, b, pg)] + _valid_tokens(cache, b, last)
            assert got == want, f"row ({b}, {h}): the valid tokens of the chosen pages, in page order, last page last"
            pad = idx[b, h, n:]
            assert bool(((pad >= start) & (pad < L)).all()), f"row ({b}, {h}): padding must hold valid positions"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("length,start,budget,page_size,dtype,D,G", [
    (500, [0, 0], 64, 16, torch.float16, 64, 4),  # no padding: whole pages, then the partial last page
    (37, [0, 0, 0], 16, 8, torch.float32, 64, 1),
    (1001, [0, 300], 100, 16, torch.bfloat16, 128, 8),  # left padding: the short row's valid tokens compacted
    (1001, [5, 600, 0], 257, 16, torch.float16, 64, 2),  # a row with fewer valid pages than the budget
    (500, [3, 0], 16, 16, torch.float16, 64, 4),  # a budget of one page: the last page only
    (37, [6, 0], 20, 8, torch.float16, 64, 4),  # the short row's first valid page is partial
])
def test_quest_select_matches_float64_reference(device, length, start, budget, page_size, dtype, D, G):
    B = len(start)
    cache = make_cache(B, 2, D, length=length, dtype=dtype, device=device, start=start, page_size=page_size,
                       seed=length + budget)
    q = torch.randn(B, 2 * G, D, generator=torch.Generator().manual_seed(budget)).to(dtype).to(device)
    sel = quest.quest_select(q, cache, budget, page_size)
    assert not sel.is_full_range
    _check_quest_selection(sel, q, cache, budget)
    # The torch selector: same counts (without padding the count depends on the budget only) and, up to near-ties
    # of float32 sums, the same tokens.
    ref_cache = cache if device == "cpu" else make_cache(B, 2, D, length=length, dtype=dtype, start=start,
                                                         page_size=page_size, seed=length + budget)
    ref = make_selector(SelectorConfig(type="quest", token_budget=budget, page_size=page_size))(
        q.cpu(), ref_cache, StepPlan.for_cache(ref_cache))
    if max(start) == 0:
        assert torch.equal(sel.counts.cpu(), ref.counts.cpu())
    agree = (sel.to_mask(length).cpu() == ref.to_mask(length).cpu()).float().mean()
    assert agree > 0.95


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("budget", [16, 100, 400])
def test_quest_select_over_many_blocks(device, budget, monkeypatch):
    """Page rows split over several programs (16 pages each): the per-block candidates and their merge give the
    same pages, also when a block holds fewer candidates than the budget or the budget is one page."""
    monkeypatch.setattr(quest, "_PAGE_BLOCK", 16)
    monkeypatch.setattr(quest, "_EXPAND_TOKENS", 64)
    cache = make_cache(2, 2, 64, length=1001, dtype=torch.float16, device=device, start=[0, 170], seed=3)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(7)).half().to(device)
    _check_quest_selection(quest.quest_select(q, cache, budget), q, cache, budget)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n_pages", [6, 20])  # fewer / more pages than a block holds
def test_quest_select_ties_go_to_lower_pages(device, n_pages, monkeypatch):
    """A zero query bounds every page by 0: the tie is broken towards the lower page index, across blocks."""
    monkeypatch.setattr(quest, "_PAGE_BLOCK", 16)
    cache = make_cache(2, 2, 64, length=700, dtype=torch.float16, device=device, start=[0, 40])
    sel = quest.quest_select(torch.zeros(2, 4, 64, dtype=torch.float16, device=device), cache, 16 * n_pages)
    for b, first in ((0, 0), (1, 2)):  # sequence 1's pages start at 40: its page 2 is [40, 56)
        for h in range(2):
            toks = sel.indices[b, h, :sel.counts[b, h]].cpu()
            pages = sorted(set(((toks - 8 * b) // 16).tolist()))
            assert pages == list(range(first, first + n_pages - 1)) + [43], (b, h, pages)
            assert int(toks.min()) == (0 if b == 0 else 40)


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
        got = sorted(set(((sel.indices[0, h, :sel.counts[0, h]].cpu() - 5) // 16).tolist()))  # pages from 5
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
                            [float("-inf"), float("-inf"), float("-inf"), 3.0, 3.0, 3.0, 3.0, 4.0]]],
                          device=device)
    sel = quest.top_pages_to_tokens(scores, cache, n_pages=3)
    # The sequence's pages are cut from its first valid token, 40: page g holds [16 g + 8, 16 g + 24)
    got = [sorted(set(((sel.indices[0, h, :sel.counts[0, h]].cpu() - 8) // 16).tolist())) for h in range(2)]
    assert got == [[2, 3, 5], [3, 4, 7]]
    # Page 2 is the first valid page, whole (40..55); page 7 the partial last one (120..127).
    assert sel.counts.cpu().tolist() == [[48, 16 + 16 + 8]]
    toks = sel.indices[0, 0, :48].cpu().tolist()
    assert toks[:16] == list(range(40, 56))


def test_rejects_bad_inputs():
    cache = make_cache(1, 2, 64, length=50)
    with pytest.raises(ValueError, match="page_size"):
        quest.quest_select(torch.randn(1, 4, 64).half(), cache, 32, page_size=8)
    with pytest.raises(ValueError, match="q must be"):
        quest.quest_page_scores(torch.randn(1, 3, 64).half(), cache)
    with pytest.raises(ValueError, match="token_budget"):
        quest.quest_select(torch.randn(1, 4, 64).half(), cache, 0)
