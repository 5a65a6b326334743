"""twilight_bench.kernels at tiny sizes: output structure and invariants (never timings)."""
import argparse
import importlib.util
import json
import os

import pytest

from twilight_bench import kernels
from twilight_bench.cli import add_bench_parser

TINY = ["--device", "cpu", "--contexts", "1k,2k", "--shapes", "4/2/64", "--dtypes", "fp32", "--batches", "1,2",
        "--token-budget", "512", "--repeats", "2", "--min-repeats", "1", "--warmup", "0", "--bandwidth-mib", "4",
        "--quiet"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    return kernels.main(TINY + ["--out", str(out)])


def test_files_written(result):
    out = result["out"]
    for name in ("kernels.json", "kernels.md", "kernels.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    data = json.load(open(os.path.join(out, "kernels.json")))
    assert data["benchmark"] == "kernels" and len(data["rows"]) == 4
    for key in ("device_name", "torch", "transformers", "triton", "date", "git"):
        assert key in data["env"]
    md = open(os.path.join(out, "kernels.md")).read()
    assert "quest-twilight" in md or "QT" in md
    assert "## Goals" in md and "## Stages" in md and "## Dense formulations" in md


def test_rows_invariants(result):
    peak = result["peak_bandwidth"]["peak_gbps"]
    assert peak > 0
    for r in result["rows"]:
        assert not r["skipped"].get("all")
        t = r["times"]
        for name in ("sdpa-gqa", "sdpa-grouped", "sdpa-expanded", "sdpa-dynamic-cat", "dense-preset",
                     *kernels.SPARSE_VARIANTS):
            assert t[name]["n"] >= 1 and t[name]["median_ms"] > 0
            assert t[name]["p25_ms"] <= t[name]["median_ms"] <= t[name]["p75_ms"]
        assert r["dense_baseline"] in kernels.DENSE_CANDIDATES
        best = t[r["dense_baseline"]]["median_ms"]
        assert best == min(t[n]["median_ms"] for n in kernels.DENSE_CANDIDATES if n in t)
        for name in kernels.SPARSE_VARIANTS:
            sp = r["speedup"][name]
            assert sp["vs_dense"] == pytest.approx(best / t[name]["median_ms"])
            assert sp["vs_quest"] == pytest.approx(t["quest"]["median_ms"] / t[name]["median_ms"])
            b = r["budgets"][name]
            assert 1 <= b["min"] <= b["mean"] <= b["max"] <= r["context"]
            assert b["mean_candidates"] <= min(r["context"], 512) + 1e-9 or name == "twilight"
            assert r["bandwidth"][name]["gbps"] > 0
        # quest keeps its whole candidate set; pruning only removes candidates
        assert r["budgets"]["quest"]["mean"] == pytest.approx(r["budgets"]["quest"]["mean_candidates"])
        assert r["budgets"]["quest-twilight"]["mean"] <= r["budgets"]["quest"]["mean"]
        assert r["bytes"]["dense"] == r["kv_bytes"] == 2 * r["batch"] * 2 * r["context"] * 64 * 4
        o = r["oracle_budget"]
        assert 1 <= o["min"] <= o["mean"] <= o["max"] <= r["context"]
        for name, stages in r["stages"].items():
            assert set(stages) >= {"select", "attend"}
            if name != "quest":
                assert set(stages) == set(kernels.STAGES)
        assert r["cache_handling_gain"] > 0


def test_ops_per_step_structure(result):
    """Every row counts one decode step of each preset: ops, syncs with their sites, Triton launches."""
    md = open(os.path.join(result["out"], "kernels.md")).read()
    assert "## Ops per decode step" in md
    for r in result["rows"]:
        ops = r["ops_per_step"]
        assert set(ops) == set(kernels.OPS_PRESETS) == {"dense-preset", *kernels.SPARSE_VARIANTS}
        for name, c in ops.items():
            assert isinstance(c["ops"], int) and c["ops"] > 0, name
            assert c["ops"] == sum(c["by_op"].values())
            assert c["syncs"] == sum(s["n"] for s in c["sync_sites"])
            assert all(s["op"].startswith(("aten.", "Tensor.")) and s["where"] for s in c["sync_sites"])
            assert r["backend"] in ("cpu", "torch") and c["launches"] == 0 and c["by_kernel"] == {}  # auto on a CPU
            assert kernels._ops_cell(c) in md
        # the sparse pipeline runs more ops than one dense attention over the cache
        assert ops["quest-twilight"]["ops"] > ops["dense-preset"]["ops"]
    assert "QT ops/syncs/launches" in kernels._row_line(result["rows"][0])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the CPU interpreter)")
def test_ops_per_step_counts_triton_launches(tmp_path):
    res = kernels.main(["--device", "cpu", "--backend", "triton", "--contexts", "512", "--shapes", "4/2/64",
                        "--dtypes", "fp32", "--batches", "1", "--token-budget", "128", "--repeats", "1",
                        "--min-repeats", "1", "--warmup", "0", "--bandwidth-mib", "4", "--no-stages",
                        "--no-dynamic-baseline", "--no-plot", "--quiet", "--out", str(tmp_path)])
    (row,) = res["rows"]
    assert row["backend"] == "triton"
    for name in kernels.SPARSE_VARIANTS:
        c = row["ops_per_step"][name]
        assert c["launches"] >= 1 and c["launches"] == sum(c["by_kernel"].values()), (name, c)
    assert "## Ops per decode step" in open(os.path.join(res["out"], "kernels.md")).read()


def test_goals_not_measured_at_tiny_sizes(result):
    assert [g["met"] for g in result["goals"]] == [None, None]


def test_evaluate_goals_logic():
    def row(ctx, speed, **kw):
        return {"shape": "llama3-8b", "batch": kw.get("batch", 1), "context": ctx, "dtype": "fp32", "times": {},
                "dense_baseline": "sdpa-gqa", "speedup": {"quest-twilight": {"vs_dense": speed, "vs_quest": 2.0,
                                                                             **kw.get("extra", {})}},
                "stages": kw.get("stages", {})}
    goals = kernels.evaluate_goals([row(32768, 5.0), row(131072, 7.0)], "cpu")
    assert [g["met"] for g in goals] == [True, False]
    stages = {"quest-twilight": {"select": {"bytes": 1, "roofline": 0.7}, "attend": {"bytes": 1, "roofline": 0.5}}}
    goals = kernels.evaluate_goals([row(32768, 4.0, batch=64, extra={"vs_flashinfer": 3.5}, stages=stages)], "cuda")
    assert [g["met"] for g in goals] == [True, True, False]


def test_parse_shape_and_config():
    assert kernels.parse_shape("llama3-8b") == ("llama3-8b", 32, 8, 128)
    assert kernels.parse_shape("9/3/64") == ("9/3/64", 9, 3, 64)
    with pytest.raises(SystemExit):
        kernels.parse_shape("9/4/64")
    args = argparse.Namespace(backend="torch", page_size=16, token_budget=1024, p=0.9)
    cfg = kernels.variant_config("quest-twilight", args)
    assert cfg.dense_layers == [] and cfg.selector.token_budget == 1024 and cfg.pruner.p == 0.9
    assert kernels.variant_config("quest", args).selector.token_budget == 1024


def test_cli_parser_registers_both_benchmarks():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["bench", "kernels", "--contexts", "4k", "--shapes", "smollm2"])
    assert a.contexts == "4k" and callable(a.func)
    e = parser.parse_args(["bench", "e2e", "--models", "smollm2", "--new-tokens", "8"])
    assert e.new_tokens == 8 and callable(e.func)


@pytest.mark.parametrize("script", ["bench_kernels.py", "bench_e2e.py"])
def test_scripts_are_thin_wrappers(script):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--out" in res.stdout and "--contexts" in res.stdout


@pytest.mark.gpu
def test_tiny_run_on_cuda(tmp_path):
    """The same harness on a GPU: CUDA events, fp16, FlashInfer dense decode when installed."""
    res = kernels.main(["--device", "cuda", "--contexts", "1k", "--shapes", "4/2/64", "--dtypes", "fp16",
                        "--batches", "1,2", "--token-budget", "512", "--repeats", "3", "--min-repeats", "1",
                        "--warmup", "1", "--bandwidth-mib", "64", "--quiet", "--out", str(tmp_path)])
    assert res["env"]["device_type"] == "cuda" and res["env"]["device_name"]
    for r in res["rows"]:
        assert r["dtype"] == "fp16" and r["times"]["quest-twilight"]["median_ms"] > 0
        assert r["dense_baseline"] in kernels.DENSE_CANDIDATES
