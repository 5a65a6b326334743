"""twilight.stats.BudgetStats: recorded counts against means computed by hand; summary; plot."""
import importlib.util

import pytest
import torch

from twilight.stats import BudgetStats

T = torch.tensor


def _recorded():
    """Layer 0 dense, layer 1 sparse (two steps), layer 2 never run; batch 2, Hq 4, Hkv 2."""
    s = BudgetStats(num_layers=3, num_q_heads=4, num_kv_heads=2)
    s.record(0, T([[100, 100, 100, 100], [60, 60, 60, 60]]), T([[100, 100], [60, 60]]), T([100, 60]), dense=True)
    s.record(1, T([[10, 20, 30, 40], [1, 2, 3, 4]]), T([[25, 45], [3, 6]]), T([100, 60]), dense=False)
    s.record(1, T([[5, 5, 5, 5], [50, 60, 70, 80]]), T([[8, 9], [90, 100]]), T([101, 61]), dense=False)
    return s


def test_as_dict_by_hand():
    d = _recorded().as_dict()
    sparse_q = [10, 20, 30, 40, 1, 2, 3, 4, 5, 5, 5, 5, 50, 60, 70, 80]
    assert d["mean_attended_tokens"] == pytest.approx(sum(sparse_q) / 16)  # dense layer 0 excluded
    assert d["mean_context_tokens"] == pytest.approx((100 + 60) / 2)  # from the first recorded layer
    assert d["attended_fraction"] == pytest.approx((sum(sparse_q) / 16) / 80)
    assert d["mean_kv_tokens_read"] == pytest.approx((25 + 45 + 3 + 6 + 8 + 9 + 90 + 100) / 8)
    assert d["min_attended_tokens"] == 1 and d["max_attended_tokens"] == 80
    assert d["decode_steps"] == 4  # (step, sequence) pairs of layer 1
    assert d["per_layer"] == [
        {"layer": 0, "dense": True, "mean_attended_tokens": pytest.approx(80.0),
         "mean_kv_tokens_read": pytest.approx(80.0), "steps": 2},
        {"layer": 1, "dense": False, "mean_attended_tokens": pytest.approx(sum(sparse_q) / 16),
         "mean_kv_tokens_read": pytest.approx(286 / 8), "steps": 4},
    ]
    assert d["per_head"][0] == pytest.approx([80.0] * 4)
    assert d["per_head"][1] == pytest.approx([(10 + 1 + 5 + 50) / 4, (20 + 2 + 5 + 60) / 4, (30 + 3 + 5 + 70) / 4,
                                              (40 + 4 + 5 + 80) / 4])
    assert d["per_head"][2] is None


def test_folds_inside_and_outside_inference_mode():
    """Steps recorded under ``torch.inference_mode`` (a fold every 64 steps) and read outside it, then more steps
    recorded and read normally: the means are those of every step (no in-place update on an inference tensor)."""
    s = BudgetStats(num_layers=1, num_q_heads=2, num_kv_heads=1)
    counts = [[i % 7 + 1, i % 5 + 1] for i in range(150)]
    with torch.inference_mode():
        for c in counts[:100]:
            s.record(0, T([c]), T([[max(c)]]), T([200]), dense=False)
    first = s.as_dict()
    for c in counts[100:]:
        s.record(0, T([c]), T([[max(c)]]), T([200]), dense=False)
    d = s.as_dict()
    assert first["decode_steps"] == 100 and d["decode_steps"] == 150
    assert first["mean_attended_tokens"] == pytest.approx(sum(map(sum, counts[:100])) / 200)
    assert d["mean_attended_tokens"] == pytest.approx(sum(map(sum, counts)) / 300)
    assert d["min_attended_tokens"] == 1 and d["max_attended_tokens"] == 7


def test_steps_of_different_batch_sizes_fold_together():
    """A batch of 2 then a batch of 1 (lm-eval's last, smaller batch): every (step, sequence) row counts once."""
    s = BudgetStats(num_layers=1, num_q_heads=2, num_kv_heads=1)
    s.record(0, T([[2, 4], [6, 8]]), T([[4], [8]]), T([10, 20]), dense=False)
    s.record(0, T([[1, 3]]), T([[3]]), T([30]), dense=False)
    d = s.as_dict()
    assert d["decode_steps"] == 3
    assert d["mean_attended_tokens"] == pytest.approx((2 + 4 + 6 + 8 + 1 + 3) / 6)
    assert d["mean_context_tokens"] == pytest.approx(20.0)


def test_only_dense_layers():
    s = BudgetStats(2, 2, 1)
    s.record(0, T([[7, 7]]), T([[7]]), T([7]), dense=True)
    d = s.as_dict()
    assert d["mean_attended_tokens"] == d["mean_context_tokens"] == 7
    assert d["attended_fraction"] == pytest.approx(1.0)


def test_empty_and_reset():
    s = BudgetStats(2, 2, 1)
    d = s.as_dict()
    assert d["decode_steps"] == 0 and d["per_layer"] == [] and d["per_head"] == [None, None]
    assert d["mean_attended_tokens"] == 0 and d["attended_fraction"] == 0
    assert "no decode steps" in s.summary()
    s = _recorded()
    assert s.decode_steps == 4
    s.reset()
    assert s.decode_steps == 0 and s.as_dict()["per_layer"] == []
    assert "no decode steps" in s.summary()


def test_summary():
    text = _recorded().summary()
    lines = text.splitlines()
    assert "decode steps: 4" in lines[0]
    assert "context: 80 tokens" in lines[0]
    assert f"{sum([10, 20, 30, 40, 1, 2, 3, 4, 5, 5, 5, 5, 50, 60, 70, 80]) / 16:.1f} mean" in lines[0]
    assert "(1..80)" in lines[0]
    assert "layer" in lines[1] and "dense" in lines[1]
    assert lines[2].split() == ["0", "yes", "80.0", "80.0"]
    assert lines[3].split() == ["1", "no", "24.4", "35.8"]
    assert len(lines) == 4


def test_record_accepts_device_int32_counts():
    s = BudgetStats(1, 2, 1)
    s.record(0, T([[3, 4]], dtype=torch.int32), T([[5]], dtype=torch.int32), T([9], dtype=torch.int32), dense=False)
    assert s.as_dict()["mean_attended_tokens"] == pytest.approx(3.5)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_writes_png(tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "budget.png"
    fig = _recorded().plot(str(path), title="test")
    try:
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "test" in fig.axes[0].get_title()
    finally:
        plt.close(fig)
