"""twilight.select: sparq, tidal, snapkv and h2o against brute-force float64 references, and their config checks.

Every reference here is written from the selectors' documented semantics with plain loops over (batch, kv-head,
query head) in float64; none calls the implementation's helpers. Data are random (seeded generators), so scores
have no ties except where a selector makes them (snapkv's max pooling): top-n sets are compared exactly, and
where two scores at the boundary are within float32 resolution either choice is accepted.
"""
import math
import re

import pytest
import torch

from twilight.cache import LayerCache
from twilight.config import ConfigError, SelectorConfig, TwilightConfig
from twilight.contract import StepPlan
from twilight.pipeline import TwilightPipeline
from twilight.select import make_selector
from twilight.selection import Selection

NEG = float("-inf")
STARTS = ["none", "pad", "heavy"]  # left padding: none, some, or one sequence with fewer tokens than the budget


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is fastest, and immune to a busy CPU (spinning OpenMP threads
    slow small ops down several times when another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- helpers
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cache(B, Hkv, D, start=None):
    return LayerCache(B, Hkv, D, dtype=torch.float32, page_size=16,
                      start=None if start is None else torch.tensor(start))


def _start(kind, L):
    """Each sequence's first valid position for a cache of ``L`` prompt tokens (``None``: no padding)."""
    return {"none": None, "pad": [0, 17], "heavy": [3, L - 10]}[kind]


def _starts(start, B):
    return [0] * B if start is None else list(start)


def _plan(cache, kind="host", scale=0.125):
    """``kind``: ``host`` (host reads allowed) or ``device`` (fixed shapes, as on a GPU)."""
    return StepPlan(cache.length, cache.min_start, cache.max_start, host_reads=kind == "host", scale=scale)


def _rows(sel, cache):
    """Per (b, h): the selected positions as a set, after checking the row is well formed."""
    B, H, K = sel.indices.shape
    assert (B, H) == (cache.batch, cache.num_kv_heads) and sel.counts.shape == (B, H)
    assert sel.indices.dtype == torch.int32 and sel.counts.dtype == torch.int32
    out = []
    for b in range(B):
        row = []
        for h in range(H):
            n = int(sel.counts[b, h])
            assert 0 <= n <= K
            got = sel.indices[b, h, :n].tolist()
            assert len(got) == len(set(got)), f"({b}, {h}): duplicate positions {sorted(got)}"
            bad = [t for t in got if not int(cache.start[b]) <= t < cache.length]
            assert not bad, f"({b}, {h}): positions {bad} outside [start={int(cache.start[b])}, {cache.length})"
            row.append(set(got))
        out.append(row)
    return out


def _check_topk(got, scores, n, what):
    """``got`` must be a set of the ``n`` highest finite ``scores`` (float64, ``-inf``: not eligible); fewer when
    fewer are eligible. Scores within float32 resolution of the boundary may go either way (ties)."""
    got = set(got)
    eligible = torch.isfinite(scores)
    n = min(n, int(eligible.sum()))
    assert len(got) == n, f"{what}: {len(got)} positions selected, expected {n}"
    if n == 0:
        return
    idx = torch.tensor(sorted(got))
    assert bool(eligible[idx].all()), f"{what}: ineligible positions {[t for t in got if not eligible[t]]}"
    ref = set(torch.argsort(scores, descending=True)[:n].tolist())
    if got == ref:
        return
    others = eligible.clone()
    others[idx] = False
    tol = 1e-4 * max(1.0, float(scores[eligible].abs().max()))
    lowest, best_left = float(scores[idx].min()), float(scores[others].max())
    assert lowest >= best_left - tol, (f"{what}: got {sorted(got - ref)} instead of {sorted(ref - got)} "
                                       f"(lowest kept {lowest}, best dropped {best_left})")


def _all_valid(start, L):
    return set(range(start, L))


def _attend_ref(q, k, v, rows, scale):
    """float64 softmax attention of ``q [B, Hq, D]`` over the positions ``rows[b][h]`` of its kv-head."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        for j in range(Hq):
            idx = torch.tensor(sorted(rows[b][j // G]), dtype=torch.long)
            logits = (k[b, j // G, idx].double() @ q[b, j].double()) * scale
            out[b, j] = torch.softmax(logits, 0) @ v[b, j // G, idx].double()
    return out


def _mass(q, k, rows, cand, scale, b, j, G):
    """Attention mass of query head ``j`` over ``rows`` within the candidate set ``cand`` (float64)."""
    idx = torch.tensor(sorted(cand), dtype=torch.long)
    p = torch.softmax((k[b, j // G, idx].double() @ q[b, j].double()) * scale, 0)
    keep = torch.tensor([t in rows for t in idx.tolist()])
    return float(p[keep].sum())


# ---------------------------------------------------------------------------------------------- references
def _group_scores(q, k, start, L, r=None):
    """Token scores ``[B, Hkv, L]`` float64, max over each kv-head's query heads, ``-inf`` outside [start, L):
    exact q·k (``r`` None), or SparQ's: per query head its ``r`` channels of largest |q|, sum of q_c * k_c over
    them divided by sqrt(D)."""
    B, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    scores = torch.full((B, H, L), NEG, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for g in range(G):
                qj, kh = q[b, h * G + g].double(), k[b, h, :L].double()
                if r is None:
                    s = kh @ qj
                else:
                    ch = torch.argsort(qj.abs(), descending=True)[:r]
                    s = (kh[:, ch] * qj[ch]).sum(-1) / math.sqrt(D)
                scores[b, h] = torch.maximum(scores[b, h], s)
            scores[b, h, :start[b]] = NEG
    return scores


def _sparq_scores(q, k, start, L, r):
    return _group_scores(q, k, start, L, r)


def _exact_scores(q, k, start, L):
    return _group_scores(q, k, start, L)


def _snapkv_pooled(qw, k, start, P, ksize, pooling, scale):
    """SnapKV's pooled votes ``[B, Hkv, P - W]`` float64 (``-inf`` before start) from the window queries
    ``qw [B, Hq, W, D]`` at positions P-W..P-1, each attending causally to [start, i]."""
    B, Hq, W, D = qw.shape
    H = k.shape[1]
    G = Hq // H
    n = P - W
    pooled = torch.full((B, H, n), NEG, dtype=torch.float64)
    pad = ksize // 2
    for b in range(B):
        s = start[b]
        for h in range(H):
            votes = torch.zeros(n, dtype=torch.float64)
            for g in range(G):
                for w in range(W):
                    i = P - W + w
                    if i < s:  # a padded query casts no vote
                        continue
                    p = torch.softmax((k[b, h, s:i + 1].double() @ qw[b, h * G + g, w].double()) * scale, 0)
                    m = min(i + 1, n) - s
                    if m > 0:
                        votes[s:s + m] += p[:m]
            for t in range(s, n):
                lo, hi = max(0, t - pad), min(n, t + pad + 1)
                if pooling == "avgpool":
                    pooled[b, h, t] = votes[lo:hi].sum() / ksize  # zero padding, divisor always ksize
                else:
                    pooled[b, h, t] = votes[lo:hi].max()
    return pooled


def _check_snapkv_rows(rows, pooled, start, P, L, N, W, what):
    """A decode step's selection: the kept prompt tokens (top N - W pooled + the window) and [P, L)."""
    for b, row in enumerate(rows):
        s = start[b]
        generated = set(range(P, L))
        for h, got in enumerate(row):
            tag = f"{what} ({b}, {h})"
            if pooled is None:  # every prompt token fits
                assert got == _all_valid(s, L), tag
                continue
            window = set(range(max(P - W, s), P))
            assert window | generated <= got, f"{tag}: window or generated tokens missing"
            _check_topk(got - window - generated, pooled[b, h], N - W, tag)


def _h2o_prompt_acc(qp, k, start, P, scale):
    """H2O's accumulated attention ``[B, Hkv, P]`` float64 from the prompt queries ``qp [B, Hq, P, D]``."""
    B, Hq, _, D = qp.shape
    H = k.shape[1]
    G = Hq // H
    acc = torch.zeros(B, H, P, dtype=torch.float64)
    for b in range(B):
        s = start[b]
        n = P - s
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for h in range(H):
            for g in range(G):
                logits = (qp[b, h * G + g, s:P].double() @ k[b, h, s:P].double().T) * scale  # [query, key]
                acc[b, h, s:P] += torch.softmax(logits.masked_fill(~causal, NEG), -1).sum(0)
    return acc


def _h2o_check_and_update(rows, acc, q, k, start, L, N, R, scale, what):
    """Check a decode step's selection against the accumulated scores ``acc`` and return the updated ``acc``."""
    B, H = len(rows), len(rows[0])
    G = q.shape[1] // H
    acc = torch.cat([acc, acc.new_zeros(B, H, L - acc.shape[-1])], -1)
    everything = L - min(start) <= N
    for b in range(B):
        s = start[b]
        for h in range(H):
            got, tag = rows[b][h], f"{what} ({b}, {h})"
            if everything:
                assert got == _all_valid(s, L), tag
            else:
                recent = set(range(max(L - R, s), L))
                assert recent <= got, f"{tag}: recent tokens missing"
                scores = acc[b, h].clone()
                scores[:s] = NEG
                scores[L - R:] = NEG
                _check_topk(got - recent, scores, N - R, tag)
            idx = torch.tensor(sorted(got), dtype=torch.long)
            for g in range(G):
                p = torch.softmax((k[b, h, idx].double() @ q[b, h * G + g].double()) * scale, 0)
                acc[b, h, idx] += p
    return acc


# ---------------------------------------------------------------------------------------------- sparq
@pytest.mark.parametrize("plan_kind", ["host", "device"])
@pytest.mark.parametrize("L,N,r,D", [(200, 64, 8, 32), (300, 50, 4, 64), (200, 40, 16, 16), (90, 100, 8, 16),
                                     (110, 100, 8, 16)])
@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("G", [1, 3])
def test_sparq_matches_reference(G, start, L, N, r, D, plan_kind):
    g = _gen(1000 * G + L + N + r)
    B, H = 2, 2
    start = _start(start, L)
    cache = _cache(B, H, D, start)
    k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    cache.append(k, v)
    q = torch.randn(B, H * G, D, generator=g)
    sel = make_selector(SelectorConfig(type="sparq", token_budget=N, num_channels=r))(q, cache, _plan(cache, plan_kind))
    rows = _rows(sel, cache)
    st = _starts(start, B)
    scores = _sparq_scores(q, k, st, L, r)
    for b in range(B):
        for h in range(H):
            if L - min(st) <= N:
                assert rows[b][h] == _all_valid(st[b], L)
            else:
                _check_topk(rows[b][h], scores[b, h], N, f"sparq ({b}, {h})")


def test_sparq_is_not_exact_topk():
    """With r < head_dim the approximate scores pick a different set than exact q·k (the test data tell them
    apart), and the reference agrees with the selector, not with exact top-k."""
    g = _gen(7)
    B, H, D, L, N = 1, 1, 64, 300, 30
    cache = _cache(B, H, D)
    k = torch.randn(B, H, L, D, generator=g)
    cache.append(k, torch.randn(B, H, L, D, generator=g))
    q = torch.randn(B, H, D, generator=g)
    got = _rows(make_selector(SelectorConfig(type="sparq", token_budget=N, num_channels=2))(q, cache, _plan(cache)),
                cache)[0][0]
    exact = set(torch.argsort(_exact_scores(q, k, [0], L)[0, 0], descending=True)[:N].tolist())
    assert got != exact
    _check_topk(got, _sparq_scores(q, k, [0], L, 2)[0, 0], N, "sparq r=2")


@pytest.mark.parametrize("L", [20, 200])
def test_sparq_rejects_more_channels_than_head_dim(L):
    cache = _cache(1, 2, 32)
    cache.append(torch.randn(1, 2, L, 32), torch.randn(1, 2, L, 32))
    sel = make_selector(SelectorConfig(type="sparq", token_budget=64, num_channels=33))
    with pytest.raises(ValueError, match=re.escape("selector.num_channels")):
        sel(torch.randn(1, 4, 32), cache, _plan(cache))


# ---------------------------------------------------------------------------------------------- tidal
@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("num_layers,layers,expected_layers,N", [
    (6, [1, 3], [1, 3], 40),
    (8, None, [2, 3], 40),  # default: [2, round(13 / 32 * 8)]
    (4, [0], [0], 25),
    (6, [3, 1], [1, 3], 160),  # every valid token fits the budget
])
@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("G", [1, 3])
def test_tidal_matches_reference(G, start, num_layers, layers, expected_layers, N, host):
    g = _gen(100 * G + num_layers + N)
    B, H, D, L0 = 2, 2, 32, 150
    start = _start(start, L0)
    cfg = SelectorConfig(type="tidal", token_budget=N, reselection_layers=layers)
    sels = [make_selector(cfg, i, num_layers) for i in range(num_layers)]
    caches = [_cache(B, H, D, start) for _ in range(num_layers)]
    keys = [torch.randn(B, H, L0, D, generator=g) for _ in range(num_layers)]
    for c, k in zip(caches, keys, strict=True):
        c.append(k, torch.randn(B, H, L0, D, generator=g))
    st = _starts(start, B)
    for step in range(2):
        if step:  # a decode token in every layer
            for i, c in enumerate(caches):
                kn = torch.randn(B, H, 1, D, generator=g)
                c.append(kn, torch.randn(B, H, 1, D, generator=g))
                keys[i] = torch.cat([keys[i], kn], 2)
        L = caches[0].length
        plan = _plan(caches[0], "host" if host else "device")
        qs = [torch.randn(B, H * G, D, generator=g) for _ in range(num_layers)]
        got = [_rows(sel(q, c, plan), c) for sel, q, c in zip(sels, qs, caches, strict=True)]  # in layer order
        stored = None
        for i in range(num_layers):
            if i in expected_layers:
                stored = _exact_scores(qs[i], keys[i], st, L)
            for b in range(B):
                for h in range(H):
                    tag = f"tidal step {step} layer {i} ({b}, {h})"
                    if i < min(expected_layers) or i in expected_layers:
                        assert got[i][b][h] == _all_valid(st[b], L), tag
                    else:  # the last re-selection layer's tokens, whatever this layer's own q
                        _check_topk(got[i][b][h], stored[b, h], N, tag)


def test_tidal_reuse_layers_follow_the_reselection_not_their_own_query():
    """A reuse layer returns the re-selection layer's tokens, not the top tokens of its own q."""
    g = _gen(3)
    B, H, D, L, N = 1, 2, 32, 200, 20
    cfg = SelectorConfig(type="tidal", token_budget=N, reselection_layers=[0])
    cache = _cache(B, H, D)
    k = torch.randn(B, H, L, D, generator=g)
    cache.append(k, torch.randn(B, H, L, D, generator=g))
    q0, q1 = torch.randn(B, 2 * H, D, generator=g), torch.randn(B, 2 * H, D, generator=g)
    plan = _plan(cache)
    make_selector(cfg, 0, 2)(q0, cache, plan)
    got = _rows(make_selector(cfg, 1, 2)(q1, cache, plan), cache)
    for h in range(H):
        own = set(torch.argsort(_exact_scores(q1, k, [0], L)[0, h], descending=True)[:N].tolist())
        assert got[0][h] != own
        _check_topk(got[0][h], _exact_scores(q0, k, [0], L)[0, h], N, f"tidal head {h}")


def test_tidal_reuse_layer_needs_the_steps_plan():
    cfg = SelectorConfig(type="tidal", token_budget=16, reselection_layers=[1])
    cache = _cache(1, 2, 16)
    cache.append(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16))
    q = torch.randn(1, 2, 16)
    sels = [make_selector(cfg, i, 3) for i in range(3)]
    plan = _plan(cache)
    sels[0](q, cache, plan)
    sels[1](q, cache, plan)
    assert len(_rows(sels[2](q, cache, plan), cache)[0][0]) == 16
    with pytest.raises(ValueError, match="did not run with this step's plan"):  # a fresh plan: no re-selection
        sels[2](q, cache, _plan(cache))


def test_tidal_default_reselection_layers():
    cfg = SelectorConfig(type="tidal", token_budget=64)
    assert cfg.default_reselection_layers(32) == [2, 13]
    assert cfg.default_reselection_layers(30) == [2, 12]
    assert cfg.default_reselection_layers(40) == [2, 16]
    assert cfg.default_reselection_layers(8) == [2, 3]
    given = TwilightConfig.load({"selector": {"type": "tidal", "reselection_layers": [5, 1, 5]}}).selector
    assert given.reselection_layers == [1, 5] and given.default_reselection_layers(32) == [1, 5]
    with pytest.raises(ValueError):
        make_selector(cfg, 0)  # the default layers need the model's depth


@pytest.mark.parametrize("layers,dense_layers,num_layers", [([1], [1], 4), ([5], [], 4), (None, [0, 1, 2], 4),
                                                            ([2, 13], [], 8)])
def test_pipeline_rejects_tidal_layers_it_cannot_run(layers, dense_layers, num_layers):
    cfg = {"selector": {"type": "tidal", "token_budget": 32, "reselection_layers": layers},
           "estimator": {"type": "exact"}, "pruner": {"type": "none"}, "dense_layers": dense_layers}
    with pytest.raises(ConfigError, match=re.escape("selector.reselection_layers")):
        TwilightPipeline(cfg, num_layers=num_layers, num_q_heads=4, num_kv_heads=2)


# ---------------------------------------------------------------------------------------------- snapkv
@pytest.mark.parametrize("observed", ["all", "window"])
@pytest.mark.parametrize("P,N,W,ksize", [(160, 48, 16, 5), (120, 40, 8, 7), (100, 100, 16, 3), (160, 150, 16, 3)])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("G", [1, 3])
def test_snapkv_matches_reference(G, start, pooling, P, N, W, ksize, observed):
    g = _gen(10 * G + P + N + W + ksize)
    B, H, D, scale = 2, 2, 32, 0.21
    start = _start(start, P)
    cfg = SelectorConfig(type="snapkv", token_budget=N, observation_window=W, kernel_size=ksize, pooling=pooling)
    sel = make_selector(cfg)
    cache = _cache(B, H, D, start)
    k = torch.randn(B, H, P, D, generator=g) * 1.5
    cache.append(k, torch.randn(B, H, P, D, generator=g))
    qp = torch.randn(B, H * G, P, D, generator=g) * 1.5
    sel.observe(qp if observed == "all" else qp[:, :, P - W:], cache, scale)
    st = _starts(start, B)
    pooled = None if P - min(st) <= N else _snapkv_pooled(qp[:, :, P - W:], k, st, P, ksize, pooling, scale)
    for step, plan_kind in enumerate(["device", "host", "device", "host"]):
        if step:  # decode tokens after the prompt are always selected
            cache.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g))
        q = torch.randn(B, H * G, D, generator=g)
        rows = _rows(sel(q, cache, _plan(cache, plan_kind)), cache)
        _check_snapkv_rows(rows, pooled, st, P, cache.length, N, W, f"snapkv step {step}")


@pytest.mark.parametrize("chunks", [[140, 20], [100, 45, 15], [5, 155], [150, 5, 5], [160]])
@pytest.mark.parametrize("G", [1, 3])
def test_snapkv_chunked_prefill_equals_one_observe(G, chunks):
    g = _gen(G + len(chunks) + chunks[-1])
    B, H, D, P, N, W, scale = 2, 2, 32, 160, 48, 16, 0.2
    cfg = SelectorConfig(type="snapkv", token_budget=N, observation_window=W, kernel_size=5)
    start = [0, 17]
    k, v = torch.randn(B, H, P, D, generator=g) * 1.5, torch.randn(B, H, P, D, generator=g)
    qp = torch.randn(B, H * G, P, D, generator=g) * 1.5
    chunked, whole = _cache(B, H, D, start), _cache(B, H, D, start)
    sel_c, sel_w = make_selector(cfg), make_selector(cfg)
    pos = 0
    for c in chunks:
        chunked.append(k[:, :, pos:pos + c], v[:, :, pos:pos + c])
        sel_c.observe(qp[:, :, pos:pos + c], chunked, scale)
        pos += c
    whole.append(k, v)
    sel_w.observe(qp, whole, scale)
    q = torch.randn(B, H * G, D, generator=g)
    rows_c, rows_w = _rows(sel_c(q, chunked, _plan(chunked)), chunked), _rows(sel_w(q, whole, _plan(whole)), whole)
    assert rows_c == rows_w
    pooled = _snapkv_pooled(qp[:, :, P - W:], k, start, P, 5, "avgpool", scale)
    _check_snapkv_rows(rows_c, pooled, start, P, P, N, W, f"snapkv chunks {chunks}")


def test_snapkv_needs_an_observed_prompt():
    cache = _cache(1, 2, 16)
    cache.append(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16))
    sel = make_selector(SelectorConfig(type="snapkv", token_budget=40, observation_window=8))
    with pytest.raises(ValueError):
        sel(torch.randn(1, 2, 16), cache, _plan(cache))


# ---------------------------------------------------------------------------------------------- h2o
def test_h2o_refuses_a_prompt_it_never_scored_and_accumulates_from_an_empty_cache():
    """A prompt nobody observed has no accumulated attention: h2o refuses instead of ranking zeros. A cache that
    starts empty (every token a decode step) is fine: its scores accumulate from the first step."""
    sel = make_selector(SelectorConfig(type="h2o", token_budget=8, recent_tokens=4))
    cache = _cache(1, 2, 16)
    cache.append(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16))
    with pytest.raises(ValueError, match="saw no prefill"):
        sel(torch.randn(1, 2, 16), cache, _plan(cache))
    empty = _cache(1, 2, 16)
    for step in range(12):
        empty.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        got = sel(torch.randn(1, 2, 16), empty, _plan(empty))
        assert int(got.counts.max()) == min(step + 1, 8)


@pytest.mark.parametrize("chunks", ["whole", "two", "query_chunks"])
@pytest.mark.parametrize("P,N,R,D", [(120, 24, 8, 32), (150, 30, None, 16), (58, 60, 8, 32), (180, 40, 0, 64),
                                     (100, 24, 24, 16)])
@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("G", [1, 3])
def test_h2o_matches_reference(G, start, P, N, R, D, chunks, monkeypatch):
    """``chunks``: the prompt observed at once, in two chunks, or at once with its queries processed a few at a
    time (a small memory cap on the logits)."""
    g = _gen(G + P + N + D)
    if chunks == "query_chunks":
        import twilight.select.prefill

        monkeypatch.setattr(twilight.select.prefill, "_CHUNK_ELEMENTS", 7 * 2 * 2 * G * P)  # 7 queries a chunk
    B, H, scale = 2, 2, 0.2
    start = _start(start, P)
    sel = make_selector(SelectorConfig(type="h2o", token_budget=N, recent_tokens=R))
    R = N // 2 if R is None else R
    cache = _cache(B, H, D, start)
    k, v = torch.randn(B, H, P, D, generator=g) * 1.5, torch.randn(B, H, P, D, generator=g)
    qp = torch.randn(B, H * G, P, D, generator=g) * 1.5
    cuts = [0, P] if chunks == "whole" else [0, P - 30, P]
    for a, e in zip(cuts[:-1], cuts[1:], strict=True):  # each chunk's K/V first, then its queries
        cache.append(k[:, :, a:e], v[:, :, a:e])
        sel.observe(qp[:, :, a:e], cache, scale)
    st = _starts(start, B)
    acc = _h2o_prompt_acc(qp, k, st, P, scale)
    for step, plan_kind in enumerate(["host", "device", "host", "device"]):
        kn = torch.randn(B, H, 1, D, generator=g) * 1.5
        cache.append(kn, torch.randn(B, H, 1, D, generator=g))  # the new token's K/V first
        k = torch.cat([k, kn], 2)
        q = torch.randn(B, H * G, D, generator=g) * 1.5
        rows = _rows(sel(q, cache, _plan(cache, plan_kind, scale=scale)), cache)
        acc = _h2o_check_and_update(rows, acc, q, k, st, cache.length, N, R, scale, f"h2o step {step}")


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("selector,field", [
    ({"type": "sparq", "num_channels": 0}, "selector.num_channels"),
    ({"type": "snapkv", "kernel_size": 4}, "selector.kernel_size"),
    ({"type": "snapkv", "kernel_size": 0}, "selector.kernel_size"),
    ({"type": "snapkv", "pooling": "mean"}, "selector.pooling"),
    ({"type": "snapkv", "observation_window": 0}, "selector.observation_window"),
    ({"type": "snapkv", "token_budget": 16, "observation_window": 32}, "selector.token_budget"),
    ({"type": "h2o", "token_budget": 16, "recent_tokens": 17}, "selector.recent_tokens"),
    ({"type": "h2o", "recent_tokens": -1}, "selector.recent_tokens"),
    ({"type": "h2o", "recent_tokens": 2.5}, "selector.recent_tokens"),
    ({"type": "tidal", "reselection_layers": []}, "selector.reselection_layers"),
    ({"type": "tidal", "reselection_layers": ["a"]}, "selector.reselection_layers"),
    ({"type": "tidal", "reselection_layers": "2"}, "selector.reselection_layers"),
    ({"type": "tidal", "reselection_layers": [-1]}, "selector.reselection_layers"),
    ({"type": "tidal", "reselection_layers": 2}, "selector.reselection_layers"),
])
def test_config_rejects(selector, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        TwilightConfig.load({"selector": selector})


def test_config_accepts_the_new_selectors():
    for sel in ({"type": "sparq", "num_channels": 8, "token_budget": 64},
                {"type": "tidal", "token_budget": 64, "reselection_layers": [2, 13]},
                {"type": "snapkv", "token_budget": 64, "observation_window": 64, "kernel_size": 1,
                 "pooling": "maxpool"},
                {"type": "h2o", "token_budget": 64, "recent_tokens": 64},
                {"type": "h2o", "token_budget": 64, "recent_tokens": 0}):
        cfg = TwilightConfig.load({"selector": sel})
        assert all(getattr(cfg.selector, key) == value for key, value in sel.items())
    assert TwilightConfig.load({"selector": {"type": "h2o", "token_budget": 9}}).selector.h2o_recent == 4


def test_legacy_configs_load():
    sparq = TwilightConfig.load({"selector": {"type": "sparq", "r": 8, "token_budget": 256},
                                 "weight_estimator": {"type": "none"},
                                 "weight_pruner": {"type": "top_p", "threshold": 0.9}})
    assert sparq.selector.type == "sparq" and sparq.selector.num_channels == 8 and sparq.selector.token_budget == 256
    assert sparq.estimator.type == "exact" and sparq.pruner.type == "top_p" and sparq.pruner.p == 0.9
    tidal = TwilightConfig.load({"selector": {"type": "tidal_decode", "token_budget": 256,
                                              "reselection_layers": [2, 13]},
                                 "weight_estimator": {"type": "none"}, "weight_pruner": {"type": "none"}})
    assert tidal.selector.type == "tidal" and tidal.selector.reselection_layers == [2, 13]
    assert tidal.selector.token_budget == 256
    snap = TwilightConfig.load({"compressor": {"type": "snap_kv", "window_size": 64, "max_capacity_prompt": 320,
                                               "kernel_size": 5, "pooling": "avgpool"},
                                "selector": {"type": "none"}, "weight_estimator": {"type": "none"},
                                "weight_pruner": {"type": "none"}})
    s = snap.selector
    assert (s.type, s.observation_window, s.token_budget, s.kernel_size, s.pooling) == ("snapkv", 64, 320, 5,
                                                                                          "avgpool")
    defaults = TwilightConfig.load({"compressor": {"type": "snap_kv"}, "selector": {"type": "none"},
                                    "weight_estimator": {"type": "none"}, "weight_pruner": {"type": "none"}})
    s = defaults.selector
    assert (s.type, s.observation_window, s.token_budget, s.kernel_size, s.pooling) == ("snapkv", 64, 320, 5,
                                                                                          "avgpool")


@pytest.mark.parametrize("data,field", [
    ({"compressor": {"type": "snap_kv", "window_size": 64}, "selector": {"type": "quest", "token_budget": 256}},
     "compressor.type"),
    ({"compressor": {"type": "snap_kv", "window_size": 64, "observation": 3}, "selector": {"type": "none"}},
     "observation"),
    ({"compressor": {"type": "pyramid_kv"}, "selector": {"type": "none"}}, "compressor.type"),
])
def test_legacy_configs_rejected(data, field):
    data = {**data, "weight_estimator": {"type": "none"}, "weight_pruner": {"type": "none"}}
    with pytest.raises(ConfigError, match=re.escape(field)):
        TwilightConfig.load(data)


# ---------------------------------------------------------------------------------------------- pipeline
PIPE_SELECTORS = {
    "sparq": {"type": "sparq", "token_budget": 32, "num_channels": 8},
    "tidal": {"type": "tidal", "token_budget": 32, "reselection_layers": [1]},
    "snapkv": {"type": "snapkv", "token_budget": 40, "observation_window": 16, "kernel_size": 5,
               "pooling": "avgpool"},
    "h2o": {"type": "h2o", "token_budget": 24, "recent_tokens": 8},
}


@pytest.mark.parametrize("backend,host_reads", [("torch", None), ("torch", False), ("cpu", None)])
@pytest.mark.parametrize("pruner", ["none", "top_p"])
@pytest.mark.parametrize("kind", list(PIPE_SELECTORS))
def test_pipeline_with_new_selectors(kind, pruner, backend, host_reads):
    """Decode steps through the pipeline: without pruning the output is the attention over the selector's tokens
    (recomputed by the references); with top-p 0.9 (exact estimator) it is within what dropping 10% of the
    candidates' mass can change, and the pruned set holds >= 0.9 of every query head's mass."""
    g = _gen(len(kind) + len(pruner) + len(backend))
    B, Hq, H, D, P, NL, scale, p = 2, 4, 2, 32, 120, 4, 0.15, 0.9
    G = Hq // H
    spec = PIPE_SELECTORS[kind]
    pipe = TwilightPipeline({"selector": spec, "estimator": {"type": "exact"},
                             "pruner": {"type": "top_p", "p": p} if pruner == "top_p" else {"type": "none"},
                             "dense_layers": [], "dense_below": 0, "backend": backend},
                            num_layers=NL, num_q_heads=Hq, num_kv_heads=H)
    pipe.host_reads = host_reads  # False: the fixed-shape path a GPU runs
    start = [0, 17]
    caches = [pipe.new_cache(i, B, H, D, start=torch.tensor(start)) for i in range(NL)]
    keys = [torch.randn(B, H, P, D, generator=g) * 1.5 for _ in range(NL)]
    values = [torch.randn(B, H, P, D, generator=g) for _ in range(NL)]
    qp = [torch.randn(B, Hq, P, D, generator=g) * 1.5 for _ in range(NL)]
    for i in range(NL):
        caches[i].append(keys[i], values[i])
        pipe.observe(i, qp[i], caches[i], scale)
    N = spec["token_budget"]
    if kind == "h2o":
        accs = [_h2o_prompt_acc(qp[i], keys[i], start, P, scale) for i in range(NL)]
    if kind == "snapkv":
        W = spec["observation_window"]
        kept = []  # each layer's kept prompt tokens, from its own prompt queries
        for i in range(NL):
            pooled = _snapkv_pooled(qp[i][:, :, P - W:], keys[i], start, P, spec["kernel_size"], "avgpool", scale)
            top = torch.argsort(pooled, -1, descending=True)
            kept.append([[{t for t in top[b, h, :N - W].tolist() if t >= start[b]} | set(range(max(P - W, start[b]), P))
                          for h in range(H)] for b in range(B)])
    pruned_any = False
    for step in range(3):
        for i in range(NL):
            kn, vn = torch.randn(B, H, 1, D, generator=g) * 1.5, torch.randn(B, H, 1, D, generator=g)
            caches[i].append(kn, vn)
            keys[i], values[i] = torch.cat([keys[i], kn], 2), torch.cat([values[i], vn], 2)
        L = caches[0].length
        # one plan per step, shared by every layer (without a scale, decode fills it in: tidal still hands over)
        plan = pipe.plan(caches[0]) if host_reads is False else pipe.plan(caches[0], scale=scale)
        qs = [torch.randn(B, Hq, D, generator=g) * 1.5 for _ in range(NL)]
        outs = [pipe.decode(i, qs[i], caches[i], scale, plan) for i in range(NL)]
        for i in range(NL):
            tag = f"{kind} step {step} layer {i}"
            if kind == "sparq":
                scores = _sparq_scores(qs[i], keys[i], start, L, spec["num_channels"])
                cand = [[set(torch.argsort(scores[b, h], descending=True)[:N].tolist()) for h in range(H)]
                        for b in range(B)]
            elif kind == "tidal":
                if i == 1:  # the re-selection layer: layers 2 and 3 reuse its top tokens
                    stored = _exact_scores(qs[i], keys[i], start, L)
                cand = [[_all_valid(start[b], L) if i <= 1 else
                         set(torch.argsort(stored[b, h], descending=True)[:N].tolist()) for h in range(H)]
                        for b in range(B)]
            elif kind == "snapkv":
                cand = [[kept[i][b][h] | set(range(P, L)) for h in range(H)] for b in range(B)]
            else:
                R = spec["recent_tokens"]
                cand = []
                for b in range(B):
                    scores = torch.cat([accs[i][b], accs[i].new_zeros(H, L - accs[i].shape[-1])], -1)
                    scores[:, :start[b]] = NEG
                    scores[:, L - R:] = NEG
                    recent = set(range(max(L - R, start[b]), L))
                    cand.append([set(torch.argsort(scores[h], descending=True)[:N - R].tolist()) | recent
                                 for h in range(H)])
                accs[i] = _h2o_check_and_update(cand, accs[i], qs[i], keys[i], start, L, N, R, scale, tag)
            assert all(t >= start[b] for b in range(B) for h in range(H) for t in cand[b][h])
            ref = _attend_ref(qs[i], keys[i], values[i], cand, scale)
            out = outs[i].double()
            assert out.shape == (B, Hq, D)
            if pruner == "none":
                torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=tag)
                continue
            for b in range(B):
                for j in range(Hq):
                    vmax = float(values[i][b, j // G, sorted(cand[b][j // G])].abs().max())
                    err = float((out[b, j] - ref[b, j]).abs().max())
                    assert err <= 2 * (1 - p) * vmax + 1e-4, f"{tag} ({b}, {j}): {err} > {2 * (1 - p) * vmax}"
            # the estimator + pruner on these candidates keep >= p of each query head's mass
            mask = torch.zeros(B, H, L, dtype=torch.bool)
            for b in range(B):
                for h in range(H):
                    mask[b, h, sorted(cand[b][h])] = True
            pruned, _ = pipe.prune(qs[i], caches[i], Selection.from_mask(mask), scale, plan)
            kept_rows = _rows(pruned, caches[i])
            for b in range(B):
                for j in range(Hq):
                    assert kept_rows[b][j // G] <= cand[b][j // G], tag
                    pruned_any |= len(kept_rows[b][j // G]) < len(cand[b][j // G])
                    mass = _mass(qs[i], keys[i], kept_rows[b][j // G], cand[b][j // G], scale, b, j, G)
                    assert mass >= p - 1e-5, f"{tag} ({b}, {j}): kept mass {mass} < {p}"
    assert pruned_any or pruner == "none", "top-p kept every candidate: the test does not exercise pruning"


def test_h2o_second_turn_keeps_the_decode_steps_scores():
    """A second multi-token forward after decode steps (another chat turn) adds to every score accumulated so
    far: each query's softmax weights sum to 1, so the total is the number of queries seen (G=1)."""
    g = torch.Generator().manual_seed(5)
    cache = LayerCache(1, 2, 16)
    cache.append(torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g))
    sel = make_selector(SelectorConfig(type="h2o", token_budget=16, recent_tokens=4))
    sel.observe(torch.randn(1, 2, 64, 16, generator=g), cache, 0.25)
    for _ in range(3):
        cache.append(torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g))
        sel(torch.randn(1, 2, 16, generator=g), cache, StepPlan(cache.length, host_reads=True, scale=0.25))
    cache.append(torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g))
    sel.observe(torch.randn(1, 2, 5, 16, generator=g), cache, 0.25)
    totals = cache.observations["h2o_scores"].sum(-1).double()
    assert torch.allclose(totals, torch.full_like(totals, 64 + 3 + 5), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("selector", ["sparq", "tidal", "snapkv", "h2o"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_new_selectors_on_the_gpu_match_the_cpu(selector, backend):
    """The torch selectors on a CUDA device (fixed shapes, no host reads), followed by the backend's attention,
    give the CPU reference's output (float32, no pruner: the selection alone decides the output)."""
    if backend == "triton":
        pytest.importorskip("triton")
    sel = {"type": selector, "token_budget": 64}
    if selector == "tidal":
        sel["reselection_layers"] = [1]
    cfg = {"selector": sel, "estimator": {"type": "exact"}, "pruner": {"type": "none"}, "dense_layers": [],
           "dense_below": 0}
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, 2, 700, 64, generator=g), torch.randn(2, 2, 700, 64, generator=g)
    q_prompt, q = torch.randn(2, 6, 700, 64, generator=g), torch.randn(3, 2, 6, 64, generator=g)
    outs = {}
    for device, name in (("cpu", "torch"), ("cuda", backend)):
        pipe = TwilightPipeline({**cfg, "backend": name}, num_layers=3, num_q_heads=6, num_kv_heads=2)
        caches = [pipe.new_cache(i, 2, 2, 64, device=device, start=torch.tensor([0, 40])) for i in range(3)]
        for i, cache in enumerate(caches):
            cache.append(k.to(device), v.to(device))
            pipe.observe(i, q_prompt.to(device), cache, 0.125)
        plan = pipe.plan(caches[0], scale=0.125)
        outs[device] = torch.stack([pipe.decode(i, q[i].to(device), c, 0.125, plan) for i, c in enumerate(caches)])
    assert torch.allclose(outs["cuda"].cpu(), outs["cpu"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("selector", ["snapkv", "h2o"])
def test_prompt_state_follows_a_batch_reorder(selector):
    """Beam search reorders the batch (``LayerCache.select_batch``): the observations and the selector's own
    state (snapkv's kept tokens, h2o's running scores) move with their sequences."""
    g = torch.Generator().manual_seed(11)
    cfg = SelectorConfig(type=selector, token_budget=40, observation_window=8)
    caches, sels = [], []
    for _ in range(2):
        c = LayerCache(2, 1, 16)
        c.append(torch.randn(2, 1, 200, 16, generator=g), torch.randn(2, 1, 200, 16, generator=g))
        caches.append(c)
        sels.append(make_selector(cfg))
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    q_prompt, q1, q2 = (torch.randn(2, 2, 200, 16, generator=g), torch.randn(2, 2, 16, generator=g),
                        torch.randn(2, 2, 16, generator=g))
    plan = StepPlan(200, host_reads=True, scale=0.25)
    for c, s in zip(caches, sels, strict=True):
        s.observe(q_prompt, c, 0.25)
        s(q1, c, plan)  # builds the selector state
    caches[1].select_batch(torch.tensor([1, 0]))
    a, b = sels[0](q2, caches[0], plan).to_mask(200), sels[1](q2.flip(0), caches[1], plan).to_mask(200)
    assert torch.equal(a.flip(0), b)
