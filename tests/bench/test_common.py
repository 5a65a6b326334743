"""twilight_bench.common: parsing, timing summaries, interleaved measurement, output helpers."""
import json

import pytest
import torch

from twilight_bench import common


def test_parse_sizes_and_labels():
    assert common.parse_sizes("4k, 32k,128k") == [4096, 32768, 131072]
    assert common.parse_sizes("512,1.5k") == [512, 1536]
    assert common.parse_sizes([1, 2]) == [1, 2]
    with pytest.raises(ValueError):
        common.parse_sizes("4g")
    assert [common.size_label(n) for n in (4096, 4400, 512)] == ["4k", "4400", "512"]


def test_timing_quantiles():
    t = common.Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p25_ms, t.p75_ms, t.min_ms, t.max_ms, t.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert t.iqr_ms == 2.0 and t.to_dict()["iqr_ms"] == 2.0
    assert common.Timing.from_samples([7.0]).iqr_ms == 0.0


def test_measure_interleaves_and_respects_repeats():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = common.measure(fns, "cpu", warmup=1, repeats=4, shuffle=False)
    assert order == ["a", "b"] * 5  # one warm-up round, then 4 timed rounds, interleaved
    order.clear()
    common.measure(fns, "cpu", warmup=0, repeats=30)
    rounds = [tuple(order[i:i + 2]) for i in range(0, 60, 2)]
    assert set(rounds) == {("a", "b"), ("b", "a")}  # shuffled, still one call of each per round
    assert t["a"].n == t["b"].n == 4
    t = common.measure(fns, "cpu", warmup=0, repeats=50, min_repeats=2, max_seconds=0.0)
    assert t["a"].n == 2  # stops after min_repeats once the time is up


def test_environment_slug_and_outputs(tmp_path):
    env = common.environment("cpu")
    for key in ("date", "device_name", "cpu_model", "cpu_cores", "torch", "transformers", "git"):
        assert key in env
    slug = common.device_slug(env)
    assert slug.startswith("cpu-") and slug == slug.lower() and " " not in slug
    assert common.default_out_dir(env).endswith(f"{slug}-{env['date'][:10]}")
    common.write_json(str(tmp_path / "x" / "r.json"), {"dtype": torch.float16, "t": common.Timing.from_samples([1.0])})
    data = json.loads((tmp_path / "x" / "r.json").read_text())
    assert data["dtype"] == "fp16" and data["t"]["median_ms"] == 1.0
    table = common.markdown_table(["a", "b"], [[1, 2]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert "device:" in common.environment_markdown(env)


def test_bandwidth_peak_cpu_is_measured():
    peak = common.peak_bandwidth("cpu", nbytes=4 * 2**20)
    assert peak["peak_gbps"] > 0 and peak["source"].startswith("measured")
    assert peak["peak_gbps"] == max(peak["measured"]["read_gbps"], peak["measured"]["copy_gbps"])


def test_gpu_peak_table_most_specific_first():
    names = [k for k, _ in common.GPU_PEAK_BANDWIDTH_GBPS]
    # a name that contains another must come before it, or the shorter one would shadow it
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert a.lower() not in b.lower(), f"{a!r} shadows {b!r}"
