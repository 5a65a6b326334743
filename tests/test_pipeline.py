"""twilight.pipeline: dense equals SDPA; the top-p guarantee under GQA; output equals attention over the
selected tokens; caches built for the config; errors."""
import pytest
import torch
import torch.nn.functional as F

from twilight import BackendUnavailableError, ConfigError, TwilightPipeline
from twilight.estimate import estimate_scores
from twilight.select.double_sparse import calibrate
from twilight.selection import Selection


def _sdpa(q, k, v, start, scale):
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    L = k.shape[2]
    mask = torch.arange(L).view(1, 1, 1, L) >= start.view(-1, 1, 1, 1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=mask, scale=scale).squeeze(2)


def _fill(pipe, layer, B, Hkv, D, L, start, chunks=(None,), scale=1.0):
    cache = pipe.new_cache(layer, batch=B, num_kv_heads=Hkv, head_dim=D, start=start)
    k = torch.randn(B, Hkv, L, D) * scale
    v = torch.randn(B, Hkv, L, D)
    pos = 0
    for c in chunks:
        c = L - pos if c is None else c
        cache.append(k[:, :, pos:pos + c], v[:, :, pos:pos + c])
        pos += c
    return cache, k, v


# ---------------------------------------------------------------------------------------------- dense
DENSE_CONFIGS = ["dense",
                 {"selector": "full", "estimator": "int4", "pruner": "none", "dense_layers": []},
                 {"selector": "full", "estimator": "int8", "pruner": {"type": "none"}, "dense_layers": [1]}]


@pytest.mark.parametrize("config", DENSE_CONFIGS)
@pytest.mark.parametrize("G", [1, 4])
def test_dense_configs_equal_sdpa(config, G):
    B, Hkv, D, L = 3, 2, 32, 150
    pipe = TwilightPipeline(config, num_layers=2, num_q_heads=Hkv * G, num_kv_heads=Hkv)
    start = torch.tensor([0, 17, 149])
    for layer in (0, 1):
        assert pipe.is_dense(layer)
        cache, k, v = _fill(pipe, layer, B, Hkv, D, L, start, chunks=(100, 1, None))
        q = torch.randn(B, Hkv * G, D)
        out = pipe.decode(layer, q, cache, scale=D ** -0.5)
        assert out.shape == q.shape
        assert torch.allclose(out, _sdpa(q, k, v, start, D ** -0.5), atol=1e-5)


def test_dense_layers_of_a_sparse_config_equal_sdpa():
    pipe = TwilightPipeline({"selector": {"type": "quest", "token_budget": 32, "page_size": 16},
                             "pruner": {"type": "top_p", "p": 0.5}, "dense_layers": [0, 2]},
                            num_layers=4, num_q_heads=4, num_kv_heads=2)
    assert [pipe.is_dense(i) for i in range(4)] == [True, False, True, False]
    start = torch.tensor([0, 40])
    cache, k, v = _fill(pipe, 2, 2, 2, 16, 200, start)
    # a dense layer's cache holds nothing extra
    for name in ("k_int4", "k_int8", "k_qparams", "page_bounds", "k_label"):
        assert not hasattr(cache, name)
    q = torch.randn(2, 4, 16)
    assert torch.allclose(pipe.decode(2, q, cache, 0.25), _sdpa(q, k, v, start, 0.25), atol=1e-5)
    rec = pipe.stats.as_dict()["per_layer"]
    assert rec == [{"layer": 2, "dense": True, "mean_attended_tokens": pytest.approx(180.0),
                    "mean_kv_tokens_read": pytest.approx(180.0), "steps": 2}]


# ---------------------------------------------------------------------------------------------- sparse
def _configs(tmp_path):
    path = tmp_path / "channels.json"
    calibrate({1: torch.randn(1, 8, 16, 32)}, {1: torch.randn(1, 2, 16, 32)}, num_channels=8, path=path)
    return {
        "twilight-int4": {"selector": "full", "estimator": "int4", "pruner": {"type": "top_p", "p": 0.85}},
        "quest-int4": {"selector": {"type": "quest", "token_budget": 96, "page_size": 16}, "estimator": "int4",
                       "pruner": {"type": "top_p", "p": 0.9}},
        "quest-int8-p05": {"selector": {"type": "quest", "token_budget": 50, "page_size": 10}, "estimator": "int8",
                           "pruner": {"type": "top_p", "p": 0.5}},
        "oracle-exact": {"selector": {"type": "oracle_topk", "token_budget": 64}, "estimator": "exact",
                         "pruner": {"type": "top_p", "p": 0.7}},
        "streaming-int4-p1": {"selector": {"type": "streaming", "sink_tokens": 4, "window": 60},
                              "estimator": "int4", "pruner": {"type": "top_p", "p": 1.0}},
        "double_sparse": {"selector": {"type": "double_sparse", "token_budget": 80, "channels_path": str(path),
                                       "num_channels": 8}, "estimator": "int4", "pruner": {"type": "top_p", "p": 0.8}},
    }


CONFIG_NAMES = ["twilight-int4", "quest-int4", "quest-int8-p05", "oracle-exact", "streaming-int4-p1", "double_sparse"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("G", [1, 4])
def test_top_p_guarantee_under_gqa_and_output(tmp_path, top_p_oracle, top_p_margin, masked_attention_ref, name, G):
    cfg = dict(_configs(tmp_path)[name], dense_layers=[0])
    B, Hkv, D, L, layer = 2, 2, 32, 300, 1
    pipe = TwilightPipeline(cfg, num_layers=2, num_q_heads=Hkv * G, num_kv_heads=Hkv)
    start = torch.tensor([0, 45])
    cache, k, v = _fill(pipe, layer, B, Hkv, D, L, start, chunks=(200, 1, 1, None), scale=2.0)
    q = torch.randn(B, Hkv * G, D) * 2
    scale = D ** -0.5
    p = pipe.config.pruner.p

    cand = pipe.select(layer, q, cache)
    cand_mask = cand.to_mask(L)  # [B, Hkv, L]
    valid = torch.arange(L).view(1, 1, -1) >= start.view(-1, 1, 1)
    assert not (cand_mask & ~valid).any(), "a padding position became a candidate"
    pruned, q_counts = pipe.prune(q, cache, cand, scale)
    kept = pruned.to_mask(L)
    assert not (kept & ~cand_mask).any(), "pruning added a token that was not a candidate"
    assert torch.equal(pruned.counts, kept.sum(-1, dtype=torch.int32)), "duplicate tokens in a pruned row"

    # Recompute the estimate with the backend's primitive (tested against float64 on its own: each backend may
    # round differently, e.g. the cpu backend in float32, the torch one through PyTorch's bf16 int4 GEMV) and
    # apply the sort-based oracle per query head.
    plan = pipe.plan(cache)
    est = pipe.backend(q.device).estimate(q, cache, cand, pipe.config.estimator.type, plan) * scale  # [B, Hq, K]
    oracle = top_p_oracle(est, p)  # [B, Hq, K] over candidate slots
    margin = top_p_margin(est, p).view(B, Hkv * G)
    probs = torch.softmax(est.double(), -1).nan_to_num(0.0)
    for b in range(B):
        for hq in range(Hkv * G):
            h = hq // G
            n = int(cand.counts[b, h])
            slots = cand.indices[b, h, :n].long()
            in_kept = kept[b, h, slots]  # which of this head's candidates its kv-head attends
            # the guarantee: the kv-head's set holds >= p of this query head's estimated mass
            assert float(probs[b, hq, :n][in_kept].sum()) >= p - 1e-5, (b, hq)
            # and the head's own nucleus (sort-based oracle) is inside it, unless p sits on a float boundary
            if margin[b, hq] > 1e-5:
                assert bool(in_kept[oracle[b, hq, :n]].all()), (b, hq)
    # the union: nothing is kept that no query head of the group needed
    union = torch.zeros(B, Hkv, L, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            n = int(cand.counts[b, h])
            slots = cand.indices[b, h, :n].long()
            for hq in range(h * G, (h + 1) * G):
                union[b, h, slots[oracle[b, hq, :n]]] = True
    if bool((margin > 1e-5).all()):
        assert torch.equal(kept, union)
        assert torch.equal(q_counts, oracle.sum(-1, dtype=torch.int32))

    # the output is exact attention restricted to the kept tokens
    out = pipe.decode(layer, q, cache, scale)
    ref = masked_attention_ref(q, k, v, kept, scale)
    assert torch.allclose(out.double(), ref, atol=1e-5), float((out.double() - ref).abs().max())
    stats = pipe.stats.as_dict()
    assert stats["decode_steps"] == B and stats["per_layer"][0]["dense"] is False
    assert stats["mean_kv_tokens_read"] == pytest.approx(float(kept.sum()) / (B * Hkv))
    assert stats["mean_attended_tokens"] == pytest.approx(float(q_counts.double().mean()))


def test_p_one_keeps_every_candidate():
    pipe = TwilightPipeline({"selector": "full", "estimator": "int4", "pruner": {"type": "top_p", "p": 1.0},
                             "dense_layers": []}, num_layers=1, num_q_heads=4, num_kv_heads=2)
    start = torch.tensor([0, 7])
    cache, k, v = _fill(pipe, 0, 2, 2, 64, 130, start, scale=30.0)  # very peaked: most weights underflow
    q = torch.randn(2, 4, 64)
    cand = pipe.select(0, q, cache)
    pruned, q_counts = pipe.prune(q, cache, cand, 0.125)
    assert torch.equal(pruned.to_mask(130), cand.to_mask(130))
    assert q_counts.tolist() == [[130] * 4, [123] * 4]
    assert torch.allclose(pipe.decode(0, q, cache, 0.125), _sdpa(q, k, v, start, 0.125), atol=1e-5)


@pytest.mark.parametrize("pruner", [{"type": "top_k", "k": 5}, {"type": "threshold", "threshold": 0.02}])
def test_other_pruners_union(masked_attention_ref, pruner):
    from twilight.config import PrunerConfig
    from twilight.prune import prune_mask

    pipe = TwilightPipeline({"selector": "full", "estimator": "exact", "pruner": pruner, "dense_layers": []},
                            num_layers=1, num_q_heads=6, num_kv_heads=2)
    cache, k, v = _fill(pipe, 0, 1, 2, 16, 100, None, scale=2.0)
    q = torch.randn(1, 6, 16)
    cand = pipe.select(0, q, cache)
    pruned, q_counts = pipe.prune(q, cache, cand, 0.25)
    keep = prune_mask(estimate_scores(q, cache, cand, "exact") * 0.25, PrunerConfig(**pruner))  # [1, 6, 100]
    assert torch.equal(q_counts, keep.sum(-1, dtype=torch.int32))
    assert torch.equal(pruned.to_mask(100), keep.view(1, 2, 3, 100).any(2))  # full selection: slot == position
    if pruner["type"] == "top_k":
        assert q_counts.tolist() == [[5] * 6]
    out = pipe.decode(0, q, cache, 0.25)
    assert torch.allclose(out.double(), masked_attention_ref(q, k, v, pruned.to_mask(100), 0.25), atol=1e-5)


def test_quest_without_pruning_attends_to_the_candidates(masked_attention_ref):
    pipe = TwilightPipeline({"selector": {"type": "quest", "token_budget": 48, "page_size": 16},
                             "estimator": "exact", "pruner": "none", "dense_layers": []},
                            num_layers=1, num_q_heads=2, num_kv_heads=1)
    cache, k, v = _fill(pipe, 0, 1, 1, 16, 160, torch.tensor([5]))
    q = torch.randn(1, 2, 16)
    cand = pipe.select(0, q, cache)
    assert int(cand.counts.max()) <= 48
    out = pipe.decode(0, q, cache, 0.25)
    assert torch.allclose(out.double(), masked_attention_ref(q, k, v, cand.to_mask(160), 0.25), atol=1e-5)
    assert pipe.stats.as_dict()["per_head"][0] == [float(cand.counts[0, 0])] * 2


def test_docstring_pipeline_runs_end_to_end():
    pipe = TwilightPipeline("quest-twilight", num_layers=4, num_q_heads=8, num_kv_heads=2)
    cache = pipe.new_cache(layer_idx=2, batch=1, num_kv_heads=2, head_dim=64)
    assert cache.quant_bits == 4 and hasattr(cache, "page_bounds") and cache.page_size == 16
    cache.append(torch.randn(1, 2, 500, 64), torch.randn(1, 2, 500, 64))
    for _ in range(3):
        out = pipe.decode(2, torch.randn(1, 8, 64), cache, scale=0.125)
        assert out.shape == (1, 8, 64) and bool(torch.isfinite(out).all())
        cache.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert pipe.stats.decode_steps == 3


def test_new_cache_matches_config(tmp_path):
    cfgs = _configs(tmp_path)
    pipe = TwilightPipeline(dict(cfgs["quest-int8-p05"], dense_layers=[]), 1, 2, 2)
    c = pipe.new_cache(0, 1, 2, 16)
    assert c.quant_bits == 8 and c.page_size == 10 and hasattr(c, "page_bounds") and c.label_channels is None
    pipe = TwilightPipeline(dict(cfgs["twilight-int4"], dense_layers=[]), 1, 2, 2)
    c = pipe.new_cache(0, 1, 2, 16, dtype=torch.bfloat16, start=torch.tensor([3]))
    assert c.quant_bits == 4 and not hasattr(c, "page_bounds") and c.dtype == torch.bfloat16
    assert c.start.tolist() == [3]
    pipe = TwilightPipeline(dict(cfgs["double_sparse"], dense_layers=[0]), 2, 8, 2)
    c = pipe.new_cache(1, 1, 2, 32)
    assert c.label_channels is not None and c.label_channels.shape == (2, 8)
    assert pipe.new_cache(0, 1, 2, 32).label_channels is None  # dense layer


# ---------------------------------------------------------------------------------------------- errors
def test_constructor_errors():
    with pytest.raises(ValueError, match="num_q_heads"):
        TwilightPipeline("quest-twilight", num_layers=4, num_q_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="dense_layers"):
        TwilightPipeline("quest-twilight", num_layers=1, num_q_heads=4, num_kv_heads=2)  # layers 0, 1
    with pytest.raises(ConfigError, match="pruner.p"):
        TwilightPipeline({"pruner": {"type": "top_p", "p": 0}}, num_layers=4, num_q_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match="not-a-preset"):
        TwilightPipeline("not-a-preset", num_layers=4, num_q_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("layer", [0, 1])  # dense and sparse layer
def test_decode_shape_errors(layer):
    pipe = TwilightPipeline({"selector": {"type": "quest", "token_budget": 16, "page_size": 16},
                             "pruner": {"type": "top_p", "p": 0.9}, "dense_layers": [0]}, 2, 4, 2)
    cache, _, _ = _fill(pipe, layer, 1, 2, 16, 100, None)
    for shape in [(1, 2, 16), (1, 8, 16), (1, 4), (1, 4, 8), (2, 4, 16)]:
        with pytest.raises(ValueError, match="q must be"):
            pipe.decode(layer, torch.randn(*shape), cache, 0.25)


@pytest.mark.parametrize("backend", ["cuda", "flashinfer"])
def test_unavailable_backend_fails_at_new_cache(backend):
    pipe = TwilightPipeline({"backend": backend}, num_layers=4, num_q_heads=4, num_kv_heads=2)  # lazy
    with pytest.raises(BackendUnavailableError, match=backend):
        pipe.new_cache(2, batch=1, num_kv_heads=2, head_dim=16, device="cpu")


def test_unavailable_triton_fails_at_new_cache(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pipe = TwilightPipeline({"backend": "triton"}, num_layers=4, num_q_heads=4, num_kv_heads=2)
    with pytest.raises(BackendUnavailableError, match="triton"):
        pipe.new_cache(2, batch=1, num_kv_heads=2, head_dim=16, device="cpu")


def test_explicit_torch_backend():
    pipe = TwilightPipeline({"backend": "torch", "selector": "full", "pruner": {"type": "top_p", "p": 0.9},
                             "dense_layers": []}, num_layers=1, num_q_heads=2, num_kv_heads=2)
    assert pipe.backend("cpu").name == "torch"
    cache, _, _ = _fill(pipe, 0, 1, 2, 64, 70, None)
    assert pipe.decode(0, torch.randn(1, 2, 64), cache, 0.125).shape == (1, 2, 64)
    assert isinstance(pipe.select(0, torch.randn(1, 2, 64), cache), Selection)
