"""``selector.gqa="head"`` against the original Twilight code's definitions (issue 22).

The original code (``twilight/pyimpl``) repeats K/V per query head (``repeat_kv``) before every selector, so each
query head selects its own ``token_budget`` tokens and attends only to them. The references here are plain float64
loops written from its definitions, one query head at a time:

- Quest (``quest_selector``): the sign trick (``sign = +1 if q > 0 else -1``, ``|q| . amax_page(k * sign)``), pages
  ranked by that bound, ``chunk_budget = ceil(token_budget / page_size)`` pages per head by top-k. Two departures
  of ours are documented (docs/architecture.md, "Quest details") and followed here: the most recent page is always
  kept (it counts in the budget), and pages are cut from each sequence's first valid token (left padding).
- SparQ (``sparq_selector``): the top-``r`` channels of ``|q|``, ``q_r . k_r / sqrt(head_dim)``, top-k.
- oracle top-k (``oracle_topk_selector``): exact ``q . k``, top-k.
- Double Sparsity: ``q . k`` over the kv-head's label channels, top-k.

Inputs are random float64-distinct values (no ties); padded positions hold huge keys, so selecting one shows. The
selectors run on GQA shapes (G = 1, 3, 4) with left padding and a partial last page; with G = 1 both modes must be
equal. The attention output is compared with dense attention restricted to each query head's own set.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import twilight
from tests.conftest import masked_attention_ref, top_p_margin, top_p_oracle
from twilight.cache import LayerCache
from twilight.config import ConfigError, SelectorConfig, TwilightConfig
from twilight.contract import StepPlan
from twilight.pipeline import TwilightPipeline
from twilight.select import make_selector
from twilight.selection import Selection

B, HKV, D, L, PS = 2, 2, 32, 203, 16
START = (0, 13)  # left padding of the second sequence; 203 and 190 valid tokens: both end in a partial page
SCALE = D ** -0.5


def _inputs(G: int, seed: int = 0, length: int = L):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HKV * G, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, length, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, length, D, generator=g, dtype=torch.float64)
    for b, s in enumerate(START):
        k[b, :, :s] = 1e4  # padding: any selector that reads it would pick it
    return q, k, v


def _cache(k: torch.Tensor, v: torch.Tensor, **kw) -> LayerCache:
    cache = LayerCache(B, HKV, D, page_size=PS, start=torch.tensor(START), **kw)
    cache.append(k.float(), v.float())
    return cache


# ---------------------------------------------------------------------------------------------- references
def _top(scores: dict[int, float], n: int) -> set[int]:
    return set(sorted(scores, key=lambda t: -scores[t])[:n])


def ref_quest(q, k, budget: int) -> list[list[set[int]]]:
    """Each query head's positions: the original's Quest per head, pages from the first valid token, the last kept."""
    Hq = q.shape[1]
    G = Hq // HKV
    out = []
    for b in range(B):
        rows = []
        for hq in range(Hq):
            h = hq // G
            start = START[b]
            valid = list(range(start, L))
            if len(valid) <= budget:
                rows.append(set(valid))
                continue
            pages = [valid[i:i + PS] for i in range(0, len(valid), PS)]
            sign = [1.0 if float(q[b, hq, c]) > 0 else -1.0 for c in range(D)]
            bound = {}
            for j, page in enumerate(pages):  # |q| . amax over the page of k * sign (the sign trick)
                bound[j] = sum(abs(float(q[b, hq, c])) * max(float(k[b, h, t, c]) * sign[c] for t in page)
                               for c in range(D))
            chunk_budget = min(math.ceil(budget / PS), len(pages))
            last = len(pages) - 1
            chosen = _top({j: s for j, s in bound.items() if j != last}, chunk_budget - 1) | {last}
            rows.append({t for j in chosen for t in pages[j]})
        out.append(rows)
    return out


def _ref_topk(score_fn, q, budget: int) -> list[list[set[int]]]:
    Hq = q.shape[1]
    G = Hq // HKV
    return [[_top({t: score_fn(b, hq, hq // G, t) for t in range(START[b], L)}, budget) for hq in range(Hq)]
            for b in range(B)]


def ref_oracle(q, k, budget):
    return _ref_topk(lambda b, hq, h, t: float(q[b, hq] @ k[b, h, t]), q, budget)


def ref_sparq(q, k, budget, r):
    def score(b, hq, h, t):
        channels = sorted(range(D), key=lambda c: -abs(float(q[b, hq, c])))[:r]
        return sum(float(q[b, hq, c]) * float(k[b, h, t, c]) for c in channels) / math.sqrt(D)

    return _ref_topk(score, q, budget)


def ref_double_sparse(q, k, budget, channels):
    return _ref_topk(lambda b, hq, h, t: sum(float(q[b, hq, c]) * float(k[b, h, t, c]) for c in channels[h]),
                     q, budget)


def _as_mask(sets) -> torch.Tensor:
    mask = torch.zeros(B, len(sets[0]), L, dtype=torch.bool)
    for b, rows in enumerate(sets):
        for hq, s in enumerate(rows):
            mask[b, hq, sorted(s)] = True
    return mask


def _channels_file(tmp_path, seed=3, num=6):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(D, generator=g).tolist() for _ in range(HKV)]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({f"model.layers.{i}.self_attn.k_proj": rows for i in range(2)}))
    return str(path), [sorted(r[:num]) for r in rows]


def _pipeline(selector: dict, G: int, pruner=None, estimator="exact", backend="torch", layers=1, dense=()):
    cfg = {"selector": selector, "estimator": {"type": estimator}, "pruner": pruner or {"type": "none"},
           "dense_layers": list(dense), "backend": backend, "dense_below": 0}
    return TwilightPipeline(cfg, num_layers=layers, num_q_heads=HKV * G, num_kv_heads=HKV)


def _check_head_selection(sel: Selection, G: int, expected: torch.Tensor):
    """Per query head sets equal ``expected [B, Hq, L]``; the row is their union; padding slots select nothing.
    (With one query head per kv-head, "head" is "group": the selection needs no head_mask.)"""
    assert (sel.head_mask is None) if G == 1 else (sel.head_mask is not None and sel.head_mask.shape[2] == G)
    got = sel.to_head_mask(L, G)
    assert torch.equal(got, expected), [(b, h, sorted(set(torch.nonzero(got[b, h]).flatten().tolist())
                                                       ^ set(torch.nonzero(expected[b, h]).flatten().tolist())))
                                        for b in range(B) for h in range(HKV * G) if not torch.equal(got[b, h],
                                                                                                    expected[b, h])]
    assert torch.equal(sel.to_mask(L), expected.view(B, HKV, G, L).any(2))  # K/V read once per kv-head: the union
    assert not (sel.head_valid(G) & ~sel.valid().unsqueeze(2)).any()


# ---------------------------------------------------------------------------------------------- selections
SELECTORS = {
    "quest": ({"type": "quest", "token_budget": 50, "page_size": PS}, lambda q, k, ch: ref_quest(q, k, 50)),
    "sparq": ({"type": "sparq", "token_budget": 40, "num_channels": 8}, lambda q, k, ch: ref_sparq(q, k, 40, 8)),
    "oracle_topk": ({"type": "oracle_topk", "token_budget": 40}, lambda q, k, ch: ref_oracle(q, k, 40)),
    "double_sparse": ({"type": "double_sparse", "token_budget": 40, "num_channels": 6},
                      lambda q, k, ch: ref_double_sparse(q, k, 40, ch)),
}


def _selector_cfg(name, gqa, tmp_path):
    sel = dict(SELECTORS[name][0], gqa=gqa)
    channels = None
    if name == "double_sparse":
        sel["channels_path"], channels = _channels_file(tmp_path)
    return sel, channels


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_head_selection_is_the_originals_per_query_head_selection(name, G, tmp_path):
    q, k, v = _inputs(G)
    sel_cfg, channels = _selector_cfg(name, "head", tmp_path)
    pipe = _pipeline(sel_cfg, G)
    cache = pipe.new_cache(0, B, HKV, D, start=torch.tensor(START))
    cache.append(k.float(), v.float())
    sel = pipe.select(0, q.float(), cache)
    expected = _as_mask(SELECTORS[name][1](q, k, channels))
    _check_head_selection(sel, G, expected)
    # the budget is per query head: every head of the unpadded sequence attends to exactly its own budget (Quest:
    # ceil(50 / 16) = 4 pages, the last one partial)
    per_head = expected[0].sum(-1)
    assert per_head.tolist() == [3 * PS + L % PS if name == "quest" else 40] * (HKV * G)


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_head_attention_is_dense_attention_over_each_heads_own_set(name, G, tmp_path):
    q, k, v = _inputs(G, seed=1)
    sel_cfg, channels = _selector_cfg(name, "head", tmp_path)
    pipe = _pipeline(sel_cfg, G)
    cache = pipe.new_cache(0, B, HKV, D, start=torch.tensor(START))
    cache.append(k.float(), v.float())
    out = pipe.decode(0, q.float(), cache, SCALE)
    expected = _as_mask(SELECTORS[name][1](q, k, channels))
    ref = masked_attention_ref(q, k, v, expected, SCALE)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    # budgets: tokens attended per query head, each its own; the kv-heads read the union
    stats = pipe.stats.as_dict()
    assert stats["per_head"][0] == pytest.approx(expected.sum(-1).double().mean(0).tolist())
    union = expected.view(B, HKV, G, L).any(2).sum(-1).double()
    assert stats["mean_kv_tokens_read"] == pytest.approx(float(union.mean()))


@pytest.mark.parametrize("G", [3, 4])
@pytest.mark.parametrize("name", ["quest", "oracle_topk"])
def test_each_head_prunes_its_own_candidates_with_top_p(name, G, tmp_path):
    """The original: ``estimated_weights[~mask] = min`` per query head, then top-p per head, then ``mask & pruned``."""
    p = 0.8
    sel_cfg, channels = _selector_cfg(name, "head", tmp_path)
    for seed in range(2, 100):  # an unambiguous case: no head's p within 1e-4 of a cumulative sum (float32 = float64)
        q, k, v = _inputs(G, seed=seed)
        candidates = _as_mask(SELECTORS[name][1](q, k, channels))
        logits = torch.einsum("bhd,bhld->bhl", q, k.repeat_interleave(G, 1)) * SCALE
        logits = logits.masked_fill(~candidates, float("-inf"))
        if float(top_p_margin(logits, p).min()) > 1e-4:
            break
    pipe = _pipeline(sel_cfg, G, pruner={"type": "top_p", "p": p})
    cache = pipe.new_cache(0, B, HKV, D, start=torch.tensor(START))
    cache.append(k.float(), v.float())
    out = pipe.decode(0, q.float(), cache, SCALE)
    kept = top_p_oracle(logits, p)
    ref = masked_attention_ref(q, k, v, kept, SCALE)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert pipe.stats.as_dict()["per_head"][0] == pytest.approx(kept.sum(-1).double().mean(0).tolist())
    # and the group semantics differ here: a head's kept set is no longer its own candidates' top-p
    group = _pipeline(dict(sel_cfg, gqa="group"), G, pruner={"type": "top_p", "p": p})
    gcache = group.new_cache(0, B, HKV, D, start=torch.tensor(START))
    gcache.append(k.float(), v.float())
    assert not torch.allclose(group.decode(0, q.float(), gcache, SCALE), out, atol=1e-4)


@pytest.mark.parametrize("pruner", [None, {"type": "top_p", "p": 0.85}])
@pytest.mark.parametrize("name", sorted(SELECTORS) + ["tidal", "snapkv"])
def test_one_query_head_per_kv_head_makes_both_modes_equal(name, pruner, tmp_path):
    q, k, v = _inputs(1, seed=4)
    outs, sels = {}, {}
    for gqa in ("group", "head"):
        if name == "tidal":
            sel_cfg = {"type": "tidal", "token_budget": 40, "reselection_layers": [0], "gqa": gqa}
        elif name == "snapkv":
            sel_cfg = {"type": "snapkv", "token_budget": 48, "observation_window": 8, "gqa": gqa}
        else:
            sel_cfg, _ = _selector_cfg(name, gqa, tmp_path)
        pipe = _pipeline(sel_cfg, 1, pruner=pruner, layers=2)
        plan = None
        out = []
        for layer in range(2):
            cache = pipe.new_cache(layer, B, HKV, D, start=torch.tensor(START))
            cache.append(k.float(), v.float())
            if name == "snapkv":
                g = torch.Generator().manual_seed(9)
                pipe.observe(layer, torch.randn(B, HKV, 8, D, generator=g), cache, SCALE)
            plan = plan or pipe.plan(cache, scale=SCALE)
            sels[gqa, layer] = pipe.select(layer, q.float(), cache, plan)
            out.append(pipe.decode(layer, q.float(), cache, SCALE, plan))
        outs[gqa] = torch.stack(out)
    for layer in range(2):
        assert torch.equal(sels["group", layer].to_mask(L), sels["head", layer].to_head_mask(L, 1))
    assert torch.equal(outs["group"], outs["head"])


# ---------------------------------------------------------------------------------------------- the other selectors
def _single_head_problem(q, k, v, b, hq, G):
    """The G = 1 problem of query head ``hq`` of sequence ``b`` alone: its query, its kv-head's keys and values."""
    h = hq // G
    return q[b:b + 1, hq:hq + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1]


def _chosen(name: str, selector, q, cache, G: int) -> Selection:
    """What ``selector`` picks: its selection, or (tidal's re-selection layer) the pick it hands to later layers."""
    plan = _pipeline({"type": "full"}, G).plan(cache, scale=SCALE)
    sel = selector(q, cache, plan)
    return plan.shared["tidal"][0] if name == "tidal" else sel


@pytest.mark.parametrize("G", [3, 4])
@pytest.mark.parametrize("name", ["tidal", "snapkv"])
def test_tidal_and_snapkv_select_per_query_head_as_each_head_alone(name, G):
    """Under "head", each query head's set is what the same selector picks for that head alone (G = 1 and one
    kv-head, where "group" is that head's own choice): a reference independent of the per-head code."""
    q, k, v = _inputs(G, seed=5)
    window = 8
    q_prompt = torch.randn(B, HKV * G, window, D, generator=torch.Generator().manual_seed(11))
    cfg = {"tidal": {"type": "tidal", "token_budget": 40, "reselection_layers": [0]},
           "snapkv": {"type": "snapkv", "token_budget": 48, "observation_window": window}}[name]
    selector = make_selector(SelectorConfig(**cfg, gqa="head"), 0, 1)
    cache = _cache(k, v)
    if name == "snapkv":
        selector.observe(q_prompt, cache, SCALE)
    got = _chosen(name, selector, q.float(), cache, G)
    expected = torch.zeros(B, HKV * G, L, dtype=torch.bool)
    for b in range(B):
        for hq in range(HKV * G):
            h = hq // G
            alone = LayerCache(1, 1, D, page_size=PS, start=torch.tensor(START[b:b + 1]))
            alone.append(k[b:b + 1, h:h + 1].float(), v[b:b + 1, h:h + 1].float())
            one = make_selector(SelectorConfig(**cfg, gqa="group"), 0, 1)
            if name == "snapkv":
                one.observe(q_prompt[b:b + 1, hq:hq + 1], alone, SCALE)
            expected[b, hq] = _chosen(name, one, q[b:b + 1, hq:hq + 1].float(), alone, 1).to_mask(L)[0, 0]
    _check_head_selection(got, G, expected)


# ---------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("selector", [{"type": "quest", "token_budget": 50, "page_size": PS},
                                      {"type": "sparq", "token_budget": 40, "num_channels": 8}])
def test_kernel_backends_run_head_mode_as_the_torch_reference(backend, selector, monkeypatch):
    """The kernel backends run "head" (their kernels for what scores every query head, the torch reference for the
    rest): the same selection, budgets and output as the torch backend. (Exact estimates: the backends' int4
    estimates differ in float rounding, which top-p may see.)"""
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    G = 3
    q, k, v = _inputs(G, seed=6)
    outs, stats = {}, {}
    for name in ("torch", backend):
        pipe = _pipeline(dict(selector, gqa="head"), G, pruner={"type": "top_p", "p": 0.9}, backend=name)
        cache = pipe.new_cache(0, B, HKV, D, start=torch.tensor(START))
        cache.append(k.float(), v.float())
        outs[name] = pipe.decode(0, q.float(), cache, SCALE)
        stats[name] = pipe.stats.as_dict()["per_head"][0]
    torch.testing.assert_close(outs[backend], outs["torch"], atol=1e-5, rtol=1e-5)
    assert stats[backend] == stats["torch"]


def _head_selection_for(G=2):
    q, k, v = _inputs(G, seed=7)
    cache = _cache(k, v)
    selector = make_selector(SelectorConfig(type="oracle_topk", token_budget=20, gqa="head"))
    sel = selector(q.float(), cache, StepPlan.for_cache(cache))
    return q.float(), cache, sel


def test_group_only_kernels_refuse_a_head_selection_by_name():
    pytest.importorskip("triton")
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from twilight.kernels.cuda import prune_to_selection as cuda_prune
    from twilight.kernels.triton import prune_to_selection as triton_prune
    from twilight.kernels.triton import sparse_decode_attention as triton_attend

    q, cache, sel = _head_selection_for()
    scores = torch.randn(B, q.shape[1], sel.k_max)
    for call in (lambda: triton_attend(q, cache, sel, SCALE), lambda: triton_prune(scores, sel, 0.9),
                 lambda: cuda_prune(scores, sel, 0.9)):
        with pytest.raises(ValueError, match="gqa='group' only.*head_mask.*gqa='head'"):
            call()


# ---------------------------------------------------------------------------------------------- config
def test_gqa_field_is_validated_by_name():
    with pytest.raises(ConfigError, match=r"selector\.gqa='heads' is invalid: must be one of group, head"):
        TwilightConfig.load({"selector": {"type": "quest", "gqa": "heads"}})
    with pytest.raises(ConfigError, match=r"selector\.gqa='head'.*h2o.*'group' only"):
        TwilightConfig.load({"selector": {"type": "h2o", "gqa": "head"}})
    with pytest.raises(ValueError, match=r"selector\.gqa='kv'"):
        make_selector(SelectorConfig(type="oracle_topk", gqa="kv"))  # built without validation: still refused
    with pytest.raises(ValueError, match=r"selector\.gqa='head'.*h2o"):
        make_selector(SelectorConfig(type="h2o", gqa="head"))
    # full and streaming score nothing: both modes accepted, and equal
    for kind in ("full", "streaming"):
        assert TwilightConfig.load({"selector": {"type": kind, "gqa": "head"}}).selector.gqa == "head"


def test_presets_say_group_and_the_originals_configs_say_head(tmp_path):
    from twilight.config import PRESETS

    for name, preset in PRESETS.items():
        assert preset["selector"]["gqa"] == "group", name  # stated, not defaulted
        assert TwilightConfig.load(name).selector.gqa == "group"
    snap = TwilightConfig.load({"compressor": {"type": "snap_kv", "window_size": 8, "max_capacity_prompt": 40},
                                "selector": {"type": "none"}, "weight_estimator": {"type": "none"},
                                "weight_pruner": {"type": "none"}})
    assert (snap.selector.type, snap.selector.gqa) == ("snapkv", "head")
    sparq = TwilightConfig.load({"selector": {"type": "sparq", "r": 8, "token_budget": 64},
                                 "weight_estimator": {"type": "none"}, "weight_pruner": {"type": "none"}})
    assert sparq.selector.gqa == "head"
    grouped = TwilightConfig.load({"selector": {"type": "quest", "token_budget": 64, "gqa": "group"},
                                   "weight_estimator": {"type": "none"}})
    assert grouped.selector.gqa == "group"  # an explicit choice in the file wins
    cfg = TwilightConfig.load({"selector": {"type": "quest", "token_budget": 64, "gqa": "head"}})
    cfg.save(tmp_path / "c.json")
    assert TwilightConfig.load(tmp_path / "c.json").selector.gqa == "head"


# ---------------------------------------------------------------------------------------------- end to end
def _tiny(num_kv_heads: int, source=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    if source is not None:  # the same model with K/V repeated per query head (the original's repeat_kv)
        state = source.state_dict()
        G = 4 // source.config.num_key_value_heads
        for name, w in list(state.items()):
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                state[name] = w.view(-1, 16, w.shape[-1]).repeat_interleave(G, 0).reshape(-1, w.shape[-1])
        model.load_state_dict(state)
    return model


@pytest.mark.parametrize("selector", [{"type": "quest", "token_budget": 32, "page_size": 16},
                                      {"type": "oracle_topk", "token_budget": 24},
                                      {"type": "sparq", "token_budget": 24, "num_channels": 4}])
def test_patched_gqa_model_under_head_decodes_as_the_model_with_repeated_kv(selector):
    """The original's semantics end to end: a GQA model (4 query / 2 kv heads) patched with ``gqa="head"`` decodes
    as the same model with its K/V repeated per query head (4 kv-heads, so each selection is one query head's) under
    our per kv-head selection: same greedy tokens, same logits, same tokens attended per query head."""
    gqa_model = _tiny(2)
    mha_model = _tiny(4, source=gqa_model)
    ids = torch.randint(3, 1000, (1, 120), generator=torch.Generator().manual_seed(1))
    results = {}
    for key, model, gqa in (("head", gqa_model, "head"), ("mha", mha_model, "group"), ("group", gqa_model, "group")):
        cfg = {"selector": dict(selector, gqa=gqa), "estimator": {"type": "int4"},
               "pruner": {"type": "top_p", "p": 0.9}, "dense_layers": [0], "backend": "torch", "dense_below": 0}
        twilight.patch(model, cfg)
        try:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=12, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
            stats = twilight.budget_stats(model).as_dict()
        finally:
            twilight.unpatch(model)
        results[key] = (out.sequences, torch.stack(out.scores), stats)
    assert torch.equal(results["head"][0], results["mha"][0])
    torch.testing.assert_close(results["head"][1], results["mha"][1], atol=1e-3, rtol=1e-3)
    head_stats, mha_stats = results["head"][2], results["mha"][2]
    for layer in range(1, 4):
        assert head_stats["per_head"][layer] == pytest.approx(mha_stats["per_head"][layer], abs=1e-6)
    # the kv-heads read the union of their two query heads' sets, at most twice the larger one
    assert head_stats["mean_kv_tokens_read"] >= head_stats["mean_attended_tokens"]
    # and "group" is another semantics on this model
    assert not torch.allclose(results["head"][1], results["group"][1], atol=1e-3)


@pytest.mark.parametrize("selector", [{"type": "quest", "token_budget": 50, "page_size": PS},
                                      {"type": "sparq", "token_budget": 40, "num_channels": 8},
                                      {"type": "oracle_topk", "token_budget": 40}])
def test_fixed_shape_head_step_makes_no_host_sync(selector):
    """What a GPU runs (``host_reads`` false: every shape host-known): a "head" step synchronises nowhere either."""
    from twilight.diagnostics import count_ops

    G = 4
    q, k, v = _inputs(G, seed=8)
    pipe = _pipeline(dict(selector, gqa="head"), G, pruner={"type": "top_p", "p": 0.9})
    pipe.host_reads = False
    cache = pipe.new_cache(0, B, HKV, D, start=torch.tensor(START))
    cache.append(k.float(), v.float())
    pipe.decode(0, q.float(), cache, SCALE)  # warm up: derived structures built
    with count_ops() as c:
        out = pipe.decode(0, q.float(), cache, SCALE, pipe.plan(cache))
    assert c.syncs == 0, c.summary()
    reads = _pipeline(dict(selector, gqa="head"), G, pruner={"type": "top_p", "p": 0.9})
    cache2 = reads.new_cache(0, B, HKV, D, start=torch.tensor(START))
    cache2.append(k.float(), v.float())
    torch.testing.assert_close(out, reads.decode(0, q.float(), cache2, SCALE), atol=1e-5, rtol=1e-5)  # CPU's path
