"""twilight.select: Quest page bounds and selector, streaming, oracle top-k, double sparsity, full, compact."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight._tensors import compact
from twilight.cache import LayerCache
from twilight.config import SelectorConfig, TwilightConfig
from twilight.contract import StepPlan
from twilight.select import make_selector, quest_page_scores, selector_channels
from twilight.select.double_sparse import calibrate, channel_importance, load_channels


def _cache(B, Hkv, D, L, *, page_size=16, start=None, dtype=torch.float32, scale=1.0, **kw):
    cache = LayerCache(B, Hkv, D, dtype=dtype, page_size=page_size, start=start, **kw)
    k = (torch.randn(B, Hkv, L, D) * scale).to(dtype)
    v = torch.randn(B, Hkv, L, D).to(dtype)
    cache.append(k, v)
    return cache, k, v


def _exact_group_scores(q, k):
    """max over the group's query heads of exact q·k: ``[B, Hkv, L]`` float64."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.double().view(B, Hkv, Hq // Hkv, D)
    return torch.einsum("bhgd,bhld->bhgl", qg, k.double()).amax(2)


def _valid(cache):
    pos = torch.arange(cache.length)
    return (pos.view(1, -1) >= cache.start.view(-1, 1))  # [B, L]


def _rows(sel):
    """Per (b, h): the list of valid selected positions."""
    B, H, _ = sel.indices.shape
    return [[sel.indices[b, h, :int(sel.counts[b, h])].tolist() for h in range(H)] for b in range(B)]


# ---------------------------------------------------------------------------------------------- compact
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 30), density=st.floats(0, 1), seed=st.integers(0, 999))
def test_compact(rows, n, density, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1000, (rows, n), generator=g)
    keep = torch.rand(rows, n, generator=g) < density
    out, counts = compact(values, keep)
    assert out.dtype == torch.int32 and counts.dtype == torch.int32
    assert out.shape[-1] == max(int(keep.sum(-1).max()), 1)
    for r in range(rows):
        expected = values[r][keep[r]].tolist()
        assert counts[r] == len(expected)
        assert out[r, :len(expected)].tolist() == expected
        # padding repeats a kept value (a valid position) or 0
        fill = expected[0] if expected else 0
        assert all(x == fill for x in out[r, len(expected):].tolist())


# ---------------------------------------------------------------------------------------------- full
def test_full_selector_respects_start():
    cache, _, _ = _cache(2, 2, 8, 40, start=torch.tensor([0, 13]))
    sel = make_selector(SelectorConfig(type="full"))(torch.randn(2, 4, 8), cache)
    assert sel.is_full_range
    mask = sel.to_mask(40)
    assert torch.equal(mask, _valid(cache).unsqueeze(1).expand(2, 2, 40))


# ---------------------------------------------------------------------------------------------- quest
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size,L,G", [(16, 200, 1), (16, 200, 4), (7, 101, 2), (1, 30, 3), (64, 130, 2)])
def test_quest_page_scores_upper_bound(dtype, page_size, L, G):
    B, Hkv, D = 2, 2, 32
    start = torch.tensor([0, 19])
    cache, k, _ = _cache(B, Hkv, D, L, page_size=page_size, start=start, dtype=dtype, scale=3.0)
    q = (torch.randn(B, Hkv * G, D) * 2).to(dtype)
    scores = quest_page_scores(q, cache)
    P = -(-L // page_size)
    assert scores.shape == (B, Hkv, P) and scores.dtype == torch.float32
    qg = q.double().view(B, Hkv, G, D)
    for b in range(B):
        first = int(start[b]) % page_size  # each sequence's pages are cut from its first valid token
        for pg in range(P):
            a, e = max(pg * page_size + first, int(start[b])), min((pg + 1) * page_size + first, L)
            if a >= e:  # only padding on this page (or past the end of an offset sequence)
                assert bool(torch.isneginf(scores[b, :, pg]).all())
                continue
            keys = k[b, :, a:e].double()  # [Hkv, n, D]
            exact = torch.einsum("hgd,hnd->hgn", qg[b], keys).amax(-1).amax(-1)  # [Hkv]
            # the Quest bound from exact per-channel page max/min (what the bf16 bounds approximate)
            hi, lo = keys.amax(1), keys.amin(1)  # [Hkv, D]
            quest = torch.maximum(qg[b] * hi.unsqueeze(1), qg[b] * lo.unsqueeze(1)).sum(-1).amax(-1)  # [Hkv]
            mag = (qg[b].abs() * keys.abs().amax(1).unsqueeze(1)).sum(-1).amax(-1)  # scale of the products
            tol = 1e-2 * mag + 1e-4
            got = scores[b, :, pg].double()
            assert bool((got >= exact - tol).all()), (b, pg, got, exact)
            assert bool(((got - quest).abs() <= tol).all()), (b, pg, got, quest)


def test_quest_page_scores_bad_q():
    cache, _, _ = _cache(1, 2, 8, 40)
    for shape in [(1, 3, 8), (2, 2, 8), (1, 2, 4)]:
        with pytest.raises(ValueError, match="q must be"):
            quest_page_scores(torch.randn(*shape), cache)


@pytest.mark.parametrize("page_size,budget,G", [(16, 64, 2), (16, 50, 1), (5, 23, 4), (1, 10, 2), (64, 100, 1)])
def test_quest_selector_picks_whole_top_pages(page_size, budget, G):
    B, Hkv, D, L = 4, 2, 16, 300
    start = torch.tensor([0, 37, 150, 290])  # the last sequence has fewer valid tokens than the budget
    cache, k, _ = _cache(B, Hkv, D, L, page_size=page_size, start=start)
    q = torch.randn(B, Hkv * G, D)
    cfg = SelectorConfig(type="quest", token_budget=budget, page_size=page_size)
    sel = make_selector(cfg)(q, cache, StepPlan.for_cache(cache))
    scores = quest_page_scores(q, cache)
    n_pages = -(-budget // page_size)
    assert int(sel.counts.max()) <= n_pages * page_size
    valid = _valid(cache)
    for b in range(B):
        for h in range(Hkv):
            rows = _rows(sel)[b][h]
            assert len(rows) == len(set(rows)), "duplicate tokens"
            assert all(int(start[b]) <= t < L for t in rows), "padding or out-of-range token selected"
            first = int(start[b]) % page_size  # the sequence's pages are cut from its first valid token
            pages = sorted({(t - first) // page_size for t in rows})
            assert len(pages) <= n_pages
            for pg in pages:  # whole pages: every valid token of a chosen page
                page_tokens = [t for t in range(pg * page_size + first, min((pg + 1) * page_size + first, L))
                               if valid[b, t]]
                assert sorted(t for t in rows if (t - first) // page_size == pg) == page_tokens
            # the most recent page is always chosen (Quest's current page); the others are the top ones by score
            last = (L - 1 - first) // page_size
            assert last in pages
            chosen = [pg for pg in pages if pg != last]
            others = [pg for pg in range(cache.num_pages)
                      if pg not in pages and pg != last and torch.isfinite(scores[b, h, pg])]
            if others:
                assert chosen and float(scores[b, h, chosen].min()) >= float(scores[b, h, others].max())
                assert len(pages) == n_pages
            # rows with enough valid tokens fill the budget (up to the page rounding)
            n_valid = L - int(start[b])
            assert len(rows) >= min(budget, n_valid) - page_size


def test_quest_selector_short_context_is_full():
    cache, _, _ = _cache(2, 2, 8, 100, start=torch.tensor([0, 40]))
    sel = make_selector(SelectorConfig(type="quest", token_budget=100, page_size=16))(torch.randn(2, 2, 8), cache,
                                                                                     StepPlan.for_cache(cache))
    assert sel.is_full_range and torch.equal(sel.to_mask(100), _valid(cache).unsqueeze(1).expand(2, 2, 100))


def test_quest_finds_the_needle():
    """A page holding a key aligned with q is always chosen."""
    cache = LayerCache(1, 1, 16, page_size=16)
    k = torch.randn(1, 1, 512, 16) * 0.1
    q = torch.randn(1, 1, 16)
    k[0, 0, 333] = q[0, 0] * 5
    cache.append(k, torch.randn(1, 1, 512, 16))
    sel = make_selector(SelectorConfig(type="quest", token_budget=32, page_size=16))(q, cache,
                                                                                  StepPlan.for_cache(cache))
    assert 333 in _rows(sel)[0][0]


def test_quest_page_size_mismatch():
    cache, _, _ = _cache(1, 1, 8, 100, page_size=8)
    with pytest.raises(ValueError, match="page_size"):
        quest = make_selector(SelectorConfig(type="quest", token_budget=16, page_size=16))
        quest(torch.randn(1, 1, 8), cache, StepPlan.for_cache(cache))


# ---------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("sinks,window", [(4, 16), (0, 8), (10, 1), (3, 200)])
def test_streaming_selector(sinks, window):
    B, Hkv, L = 3, 2, 120
    start = torch.tensor([0, 5, 115])
    cache, _, _ = _cache(B, Hkv, 8, L, start=start)
    sel = make_selector(SelectorConfig(type="streaming", sink_tokens=sinks, window=window))(torch.randn(B, 4, 8), cache,
                                                                                            StepPlan.for_cache(cache))
    for b in range(B):
        s = int(start[b])
        expected = sorted({t for t in range(s, min(s + sinks, L))} | {t for t in range(max(L - window, s), L)})
        for h in range(Hkv):
            assert sorted(_rows(sel)[b][h]) == expected


# ---------------------------------------------------------------------------------------------- oracle top-k
@pytest.mark.parametrize("budget,G", [(10, 1), (10, 4), (57, 2), (500, 2)])
def test_oracle_topk(budget, G):
    B, Hkv, D, L = 2, 2, 16, 200
    start = torch.tensor([0, 150])
    cache, k, _ = _cache(B, Hkv, D, L, start=start)
    q = torch.randn(B, Hkv * G, D)
    sel = make_selector(SelectorConfig(type="oracle_topk", token_budget=budget))(q, cache, StepPlan.for_cache(cache))
    exact = _exact_group_scores(q, k)
    for b in range(B):
        s = int(start[b])
        for h in range(Hkv):
            cand = exact[b, h, s:]
            n = min(budget, L - s)
            expected = sorted((torch.topk(cand, n).indices + s).tolist())
            assert sorted(_rows(sel)[b][h]) == expected


# ---------------------------------------------------------------------------------------------- double sparsity
def test_channel_importance_and_calibrate_pick_known_channels(tmp_path):
    B, Hq, Hkv, T, D = 2, 4, 2, 16, 32
    q = torch.randn(B, Hq, T, D) * 0.1
    k = torch.randn(B, Hkv, T, D) * 0.1
    big = {0: [3, 7, 20], 1: [0, 31, 15]}  # kv-head -> channels with large |q|·|k|
    for h, chans in big.items():
        for i, c in enumerate(chans):
            k[:, h, :, c] = 5.0 + i
            q[:, 2 * h:2 * h + 2, :, c] = -(4.0 + i)  # sign must not matter
    imp = channel_importance(q, k)
    assert imp.shape == (Hkv, D)
    # hand-computed mean |q_d| * mean |k_d| for one channel
    assert imp[0, 3] == pytest.approx(float(q[:, 0:2, :, 3].abs().mean() * k[:, 0, :, 3].abs().mean()), rel=1e-5)
    path = tmp_path / "ch.json"
    out = calibrate({5: q}, {5: k}, num_channels=3, path=path)
    assert set(out) == {5} and out[5].dtype == torch.int64
    assert out[5].tolist() == [sorted(big[0]), sorted(big[1])]
    data = json.loads(path.read_text())
    assert data["num_channels"] == 3 and data["layers"] == {"5": [sorted(big[0]), sorted(big[1])]}
    assert data["ranked"] == {"5": [big[0][::-1], big[1][::-1]]}  # most important first
    assert torch.equal(load_channels(path, 5, 3), out[5])
    # fewer channels than calibrated: the most important ones (from the ranking), ascending
    assert load_channels(str(path), 5, 2).tolist() == [sorted(big[0][1:]), sorted(big[1][1:])]
    assert load_channels(path, 5, 1).tolist() == [[big[0][2]], [big[1][2]]]


def test_calibrate_errors(tmp_path):
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="num_channels"):
        calibrate({0: q}, {0: k}, num_channels=0)
    with pytest.raises(ValueError, match="num_channels"):
        calibrate({0: q}, {0: k}, num_channels=17)
    with pytest.raises(ValueError, match="same layers"):
        calibrate({0: q}, {1: k}, num_channels=2)
    with pytest.raises(ValueError, match="multiple"):
        channel_importance(torch.randn(1, 3, 8, 16), k)
    path = tmp_path / "ch.json"
    calibrate({0: q}, {0: k}, num_channels=4, path=path)
    with pytest.raises(ValueError, match="layer 3"):
        load_channels(path, 3, 4)
    with pytest.raises(ValueError, match="num_channels"):
        load_channels(path, 0, 5)
    with pytest.raises(ValueError, match="does not exist"):
        load_channels(tmp_path / "missing.json", 0, 4)


def test_calibrate_file_without_ranking(tmp_path):
    """A calibrate file written before the ranking was saved: all its channels load, fewer is refused."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"num_channels": 3, "layers": {"0": [[1, 4, 6], [0, 2, 3]]}}))
    assert load_channels(path, 0, 3).tolist() == [[1, 4, 6], [0, 2, 3]]
    with pytest.raises(ValueError, match="ranking"):
        load_channels(path, 0, 2)


def test_recalibrating_the_same_path_is_seen(tmp_path):
    """load_channels must not serve stale channels after the file is rewritten in the same process."""
    path = tmp_path / "ch.json"
    k = torch.ones(1, 1, 4, 8)
    q1 = torch.zeros(1, 1, 4, 8)
    q1[..., 1] = 1
    q2 = torch.zeros(1, 1, 4, 8)
    q2[..., 6] = 1
    calibrate({0: q1}, {0: k}, num_channels=1, path=path)
    assert load_channels(path, 0, 1).tolist() == [[1]]
    calibrate({0: q2}, {0: k}, num_channels=1, path=path)
    assert load_channels(path, 0, 1).tolist() == [[6]]


@pytest.mark.parametrize("G,budget", [(1, 20), (4, 20), (2, 333)])
def test_double_sparse_selector_matches_brute_force(tmp_path, G, budget):
    B, Hkv, D, L, C = 2, 2, 32, 150, 6
    q_cal, k_cal = torch.randn(1, Hkv * G, 8, D), torch.randn(1, Hkv, 8, D)
    path = tmp_path / "ch.json"
    calibrate({0: q_cal, 3: q_cal}, {0: k_cal, 3: k_cal}, num_channels=C, path=path)
    cfg = SelectorConfig(type="double_sparse", token_budget=budget, channels_path=str(path), num_channels=C)
    channels = selector_channels(cfg, 3)
    assert torch.equal(channels, load_channels(path, 3, C))
    assert selector_channels(SelectorConfig(type="quest"), 3) is None
    start = torch.tensor([0, 60])
    cache, k, _ = _cache(B, Hkv, D, L, start=start, label_channels=channels)
    q = torch.randn(B, Hkv * G, D)
    sel = make_selector(cfg, layer_idx=3)(q, cache, StepPlan.for_cache(cache))
    # brute force: q·k over the label channels only, max over the group, top budget of the valid tokens
    qg = q.double().view(B, Hkv, G, D)
    for b in range(B):
        s = int(start[b])
        for h in range(Hkv):
            ch = channels[h]
            approx = torch.einsum("gc,lc->gl", qg[b, h][:, ch], k[b, h][:, ch].double()).amax(0)[s:]
            n = min(budget, L - s)
            expected = sorted((torch.topk(approx, n).indices + s).tolist())
            assert sorted(_rows(sel)[b][h]) == expected


def test_double_sparse_needs_label_cache(tmp_path):
    path = tmp_path / "ch.json"
    calibrate({0: torch.randn(1, 2, 4, 8)}, {0: torch.randn(1, 2, 4, 8)}, num_channels=2, path=path)
    sel = make_selector(SelectorConfig(type="double_sparse", token_budget=4, channels_path=str(path), num_channels=2))
    cache, _, _ = _cache(1, 2, 8, 20)
    with pytest.raises(ValueError, match="label_channels"):
        sel(torch.randn(1, 2, 8), cache, StepPlan.for_cache(cache))


def test_make_selector_unknown_type():
    with pytest.raises(ValueError, match="selector.type"):
        make_selector(SelectorConfig(type="bogus"))


def test_selectors_reject_bad_q():
    cache, _, _ = _cache(1, 2, 8, 100)
    for cfg in [SelectorConfig(type="quest", token_budget=16), SelectorConfig(type="oracle_topk", token_budget=16)]:
        with pytest.raises(ValueError, match="q must be"):
            make_selector(cfg)(torch.randn(1, 3, 8), cache, StepPlan.for_cache(cache))


# ---------------------------------------------------------------------------------------------- DoubleSparse files
def _ds_file(path, layers, D, heads, seed=0, projections=("q", "k", "qk")):
    """A DoubleSparse channel file: per layer and projection, one permutation of range(D) per head, most
    important first. Returns ``{(layer, proj): rows}``."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for layer in layers:
        for proj in projections:
            n = heads[proj] if isinstance(heads, dict) else heads
            rows[(layer, proj)] = [torch.randperm(D, generator=g).tolist() for _ in range(n)]
    path.write_text(json.dumps({f"model.layers.{layer}.self_attn.{p}_proj": r for (layer, p), r in rows.items()}))
    return rows


@pytest.mark.parametrize("key", ["q", "k", "qk"])
def test_load_double_sparse_file(tmp_path, key):
    D, H = 16, 3
    path = tmp_path / "longchat.json"
    rows = _ds_file(path, [0, 1, 2], D, H)
    for layer in (0, 2):
        for n in (1, 5, D):
            expected = [sorted(r[:n]) for r in rows[(layer, key)]]
            assert load_channels(path, layer, n, channels_key=key).tolist() == expected
            assert load_channels(str(path), layer, n, key, num_kv_heads=H).tolist() == expected
    # the default projection is k
    assert load_channels(path, 1, 4).tolist() == [sorted(r[:4]) for r in rows[(1, "k")]]


def test_original_ds_config_reads_the_double_sparse_file(tmp_path):
    """An original-Twilight ds config: config_path, r and selected_channel pick the file's rows."""
    D, H = 32, 2
    path = tmp_path / "channels.json"
    rows = _ds_file(path, range(4), D, H)
    cfg = TwilightConfig.load({"compressor": {"type": "none"},
                               "selector": {"type": "ds", "quant_bit": 2, "r": 6, "config_path": str(path),
                                            "token_budget": 64, "selected_channel": "q"},
                               "weight_estimator": {"type": "none"}, "weight_pruner": {"type": "none"},
                               "skip_first_two_layers": True, "use_estimated_weights_in_attn": False})
    for layer in range(4):
        ch = selector_channels(cfg.selector, layer, num_kv_heads=H)
        assert ch.dtype == torch.int64 and ch.tolist() == [sorted(r[:6]) for r in rows[(layer, "q")]]
    sel = make_selector(cfg.selector, layer_idx=3)
    assert sel.channels.tolist() == [sorted(r[:6]) for r in rows[(3, "q")]] and sel.label_bits == 2


def test_double_sparse_file_per_query_head_under_gqa(tmp_path):
    """GQA: q_proj/qk_proj have one row per query head; refused with a pointer to k_proj and our calibration."""
    D = 16
    path = tmp_path / "llama3.json"
    rows = _ds_file(path, [0], D, {"q": 8, "qk": 8, "k": 2})
    for key in ("q", "qk"):
        with pytest.raises(ValueError, match="calibrate_double_sparse") as info:
            load_channels(path, 0, 4, channels_key=key)
        assert "channels_key='k'" in str(info.value) and "8 rows" in str(info.value)
    expected = [sorted(r[:4]) for r in rows[(0, "k")]]
    assert load_channels(path, 0, 4, channels_key="k", num_kv_heads=2).tolist() == expected
    # without a k_proj entry to compare with, the head count tells
    only_q = tmp_path / "only_q.json"
    _ds_file(only_q, [0], D, 8, projections=("q",))
    assert load_channels(only_q, 0, 4, channels_key="q").shape == (8, 4)
    with pytest.raises(ValueError, match="calibrate_double_sparse"):
        load_channels(only_q, 0, 4, channels_key="q", num_kv_heads=2)
    cfg = SelectorConfig(type="double_sparse", channels_path=str(only_q), num_channels=4, channels_key="q")
    with pytest.raises(ValueError, match="calibrate_double_sparse"):
        selector_channels(cfg, 0, num_kv_heads=2)
    with pytest.raises(ValueError, match="calibrate_double_sparse"):  # what a cache says when given them
        LayerCache(1, 2, D, label_channels=selector_channels(cfg, 0))
    with pytest.raises(ValueError, match="another model"):
        load_channels(only_q, 0, 4, channels_key="q", num_kv_heads=3)


@pytest.mark.parametrize("content,kwargs,needle", [
    ({"model.layers.0.self_attn.k_proj": [[0, 1, 2]]}, {"layer_idx": 1}, "layer 1"),
    ({"model.layers.0.self_attn.k_proj": [[0, 1, 2]]}, {"channels_key": "q"}, "q_proj"),
    ({"model.layers.0.self_attn.k_proj": [[0, 1, 2]]}, {"num_channels": 4}, "num_channels"),
    ({"model.layers.0.self_attn.k_proj": [[0, 1, 2], [0, 1]]}, {}, "equal-length"),
    ({"model.layers.0.self_attn.k_proj": [[0, -1, 2]]}, {}, ">= 0"),
    ({"model.layers.0.self_attn.k_proj": [[0, 1.5, 2]]}, {}, "channel indices"),
    ({"model.layers.0.self_attn.k_proj": []}, {}, "non-empty"),
    ({"model.layers.0.self_attn.k_proj": [[0, 0, 2]]}, {"num_channels": 2}, "repeats"),
    ({"model.layers.0.self_attn.k_proj": [[0, 1, 2]]}, {"channels_key": "v"}, "selector.channels_key"),
    ({"something": 1}, {}, "not a label-channel file"),
    ([[0, 1]], {}, "not a label-channel file"),
    ({"num_channels": 2, "layers": {"0": [[0, "a"]]}}, {}, "channel indices"),
])
def test_load_channels_errors(tmp_path, content, kwargs, needle):
    path = tmp_path / "ch.json"
    path.write_text(json.dumps(content))
    args = {"layer_idx": 0, "num_channels": 2} | kwargs
    with pytest.raises(ValueError, match=needle):
        load_channels(path, **args)


# ---------------------------------------------------------------------------------------------- quantized labels
def _hand_quantized(x, bits):
    """Per-token min-max quantize-dequantize written out independently: float64, ties never occur here."""
    x = x.double()
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    step = (hi - lo).clamp_min(1e-9) / (2 ** bits - 1)
    return lo + torch.floor((x - lo) / step + 0.5) * step


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_double_sparse_scores_against_quantized_labels(tmp_path, bits):
    B, Hkv, G, D, L, C, budget = 2, 2, 2, 16, 120, 5, 17
    path = tmp_path / "ds.json"
    rows = _ds_file(path, [0], D, Hkv)
    cfg = SelectorConfig(type="double_sparse", token_budget=budget, channels_path=str(path), num_channels=C,
                         label_bits=bits)
    channels = selector_channels(cfg, 0)
    assert channels.tolist() == [sorted(r[:C]) for r in rows[(0, "k")]]
    start = torch.tensor([0, 30])
    torch.manual_seed(bits)
    cache, k, _ = _cache(B, Hkv, D, L, start=start, label_channels=channels, label_bits=bits)
    exact_cache = LayerCache(B, Hkv, D, start=start, label_channels=channels)  # keeps exact labels
    exact_cache.append(k, torch.zeros_like(k))
    q = torch.randn(B, Hkv * G, D)
    selector = make_selector(cfg, 0)
    sel = selector(q, cache, StepPlan.for_cache(cache))
    sel_exact_cache = selector(q, exact_cache, StepPlan.for_cache(exact_cache))
    qg = q.double().view(B, Hkv, G, D)
    differs = False
    for b in range(B):
        s = int(start[b])
        for h in range(Hkv):
            ch = channels[h]
            k_lab = _hand_quantized(k[b, h][:, ch], bits)  # [L, C]
            approx = torch.einsum("gc,lc->gl", qg[b, h][:, ch], k_lab).amax(0)[s:]
            expected = sorted((torch.topk(approx, budget).indices + s).tolist())
            assert sorted(_rows(sel)[b][h]) == expected
            assert sorted(_rows(sel_exact_cache)[b][h]) == expected  # quantized on the fly: the same
            exact = torch.einsum("gc,lc->gl", qg[b, h][:, ch], k[b, h][:, ch].double()).amax(0)[s:]
            differs |= expected != sorted((torch.topk(exact, budget).indices + s).tolist())
    assert differs or bits == 4, "the quantization should change some selection at this bit width"
    # a cache quantized differently from the config is an error, not a silent mismatch
    other = LayerCache(B, Hkv, D, start=start, label_channels=channels, label_bits=8)
    other.append(k, torch.zeros_like(k))
    with pytest.raises(ValueError, match="label_bits"):
        selector(q, other, StepPlan.for_cache(other))
