"""twilight_bench.profiles: the synthetic profile's budgets, the oracle, and replay extension."""
import torch

from twilight_bench.profiles import (
    ReplayProfile,
    SyntheticProfile,
    budget_summary,
    oracle_top_p_budgets,
    power_law_quantiles,
)


def test_power_law_quantiles_bounds_and_order():
    x = power_law_quantiles(32, 1.0, 2000.0, 1.3)
    assert x.shape == (32,) and bool((x[1:] > x[:-1]).all())
    assert 1.0 <= float(x.min()) < 1.2 and 1000 < float(x.max()) < 2000
    assert 60 < float(x.mean()) < 130  # the calibrated mean (~90), unlike log-uniform's ~260
    lu = power_law_quantiles(1000, 1.0, 2000.0, 1.0)
    assert 200 < float(lu.mean()) < 320


def test_oracle_budgets_match_brute_force():
    q = torch.randn(2, 4, 16)
    k = torch.randn(2, 2, 50, 16) * 2
    got = oracle_top_p_budgets(q, k, 0.25, 0.8)
    for b in range(2):
        for h in range(4):
            probs = torch.softmax((q[b, h] @ k[b, h // 2].T).double() * 0.25, 0)
            cum = probs.sort(descending=True).values.cumsum(0)
            assert int(got[b, h]) == int((cum < 0.8).sum()) + 1


def test_synthetic_profile_shapes_determinism_and_budgets():
    prof = SyntheticProfile(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, length=3000, growth=0.0,
                            ref_length=3000)
    q = prof.query()
    k, v = prof.keys_values()
    assert q.shape == (2, 8, 64) and k.shape == v.shape == (2, 2, 3000, 64)
    k2, _ = SyntheticProfile(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, length=3000, growth=0.0,
                             ref_length=3000).keys_values()
    assert torch.equal(k, k2)
    counts = oracle_top_p_budgets(q, k, prof.scale, 0.85)
    hot = prof.hot_counts
    assert counts.shape == hot.shape == (2, 8)
    # Exact top-p keeps about each head's hot set: peaked heads few tokens, flat heads many.
    ratio = counts.double() / hot.double()
    assert bool((ratio > 0.6).all()) and bool((ratio < 1.5).all()), (counts, hot)
    s = budget_summary(counts)
    assert s["min"] <= s["median"] <= s["max"] and s["min"] >= 1


def test_synthetic_hot_sets_grow_with_context():
    small = SyntheticProfile(1, 8, 2, 32, 4400)
    big = SyntheticProfile(1, 8, 2, 32, 4 * 4400)
    assert float(big.hot_counts.double().mean()) > 1.5 * float(small.hot_counts.double().mean())  # growth 0.5


def test_replay_profile_tiles_the_middle(tmp_path):
    T, L = 40, 100
    k = torch.arange(T, dtype=torch.float16).view(1, 1, T, 1).expand(2, 1, T, 2).clone()  # [layers, Hkv, T, D]
    path = tmp_path / "cap.pt"
    torch.save({"q": torch.ones(2, 3, 2, dtype=torch.float16), "k": k, "v": k.clone(), "scale": 0.5,
                "num_tokens": T}, path)
    prof = ReplayProfile(str(path), L, batch=2, layer=1, sink=4, recent=8)
    kk, vv = prof.keys_values()
    assert kk.shape == (2, 1, L, 2) and prof.query().shape == (2, 3, 2)
    pos = kk[0, 0, :, 0].long().tolist()
    assert pos[:4] == [0, 1, 2, 3] and pos[-8:] == list(range(T - 8, T))
    assert set(pos[4:-8]) <= set(range(4, T - 8))
    short = ReplayProfile(str(path), 20, layer=0, sink=4, recent=8).keys_values()[0][0, 0, :, 0].long().tolist()
    assert short[:4] == [0, 1, 2, 3] and short[-1] == T - 1 and len(short) == 20
