"""twilight_bench.e2e on a tiny random Llama: structure, memory accounting, budgets (never timings)."""
import json
import os

import pytest

from twilight_bench import e2e

TINY = ["--device", "cpu", "--models", "llama3-8b-random", "--contexts", "200", "--new-tokens", "4",
        "--llama-layers", "2", "--llama-vocab", "128", "--llama-intermediate", "128", "--llama-hidden", "1024",
        "--token-budget", "64", "--prefill-chunk", "128", "--rounds", "2", "--quiet"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    # Sparse from the first token, as tests/conftest.py's autouse fixture makes every test (a module-scoped fixture
    # runs before it): at 200 tokens the CPU's measured crossover would make every patched step dense.
    import twilight.config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(twilight.config, "DENSE_BELOW_AUTO", {"cpu": 0, "cuda": 0})
        return e2e.main(TINY + ["--out", str(out)])


def test_files_and_structure(result):
    out = result["out"]
    for name in ("e2e.json", "e2e.md", "e2e.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    data = json.load(open(os.path.join(out, "e2e.json")))
    (row,) = data["rows"]
    assert row["context"] == 200 and row["heads"] == "32/8/32" and row["layers"] == 2
    assert set(row["runs"]) == set(e2e.UNPATCHED + e2e.PATCHED)
    for run in row["runs"].values():
        assert run["new_tokens"] == 4 and run["per_token"]["n"] == 2 * 3  # tokens after the first, 2 rounds
        assert len(run["round_medians_ms"]) == 2
        assert run["per_token"]["median_ms"] > 0
    assert row["best_unpatched"] in e2e.UNPATCHED
    assert set(row["speedup"]) == set(e2e.PATCHED)


def test_dense_preset_decodes_like_unpatched(result):
    runs = result["rows"][0]["runs"]
    assert runs["dense"]["tokens"] == runs["hf-dynamic"]["tokens"] == runs["hf-static"]["tokens"]


def test_memory_and_budgets(result):
    runs = result["rows"][0]["runs"]
    plain = runs["hf-dynamic"]["memory"]["plain_kv_bytes"]
    assert plain == 2 * 1 * 8 * (200 + 4 - 1) * 32 * 4 * 2  # K and V, 8 kv-heads, 203 tokens, fp32, 2 layers
    assert runs["hf-dynamic"]["memory"]["total_over_plain"] == pytest.approx(1.0)
    assert runs["hf-static"]["memory"]["total_bytes"] >= plain
    assert runs["dense"]["memory"]["extra_bytes"] == 0
    for v in ("quest", "quest-twilight", "twilight"):
        m = runs[v]["memory"]
        assert m["extra_bytes"] > 0 and 0 < m["overhead_ratio"] < 0.5 and m["kv_bytes"] >= plain
        b = runs[v]["budget"]
        assert 1 <= b["min_attended_tokens"] <= b["mean_attended_tokens"] <= b["max_attended_tokens"]
        assert b["max_attended_tokens"] <= 204
    assert runs["quest"]["budget"]["mean_attended_tokens"] <= 64 + 16  # the selector budget, page-rounded


def test_markdown_separates_cache_and_sparsity_gains(result):
    md = open(os.path.join(result["out"], "e2e.md")).read()
    assert "cache gain" in md and "sparsity gain" in md and "## Memory and budgets" in md


def test_compiled_variants(tmp_path):
    """``-compiled`` variants: generate() compiled the step (dynamo's counts in the record, 0 graph breaks) and
    decoded the eager variant's tokens; the report lists them."""
    import twilight.config

    variants = "hf-static,hf-static-compiled,quest-twilight-sparse,quest-twilight-sparse-compiled"
    args = TINY + ["--rounds", "1", "--variants", variants, "--out", str(tmp_path), "--no-plot"]  # (last wins)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(twilight.config, "DENSE_BELOW_AUTO", {"cpu": 0, "cuda": 0})
        result = e2e.main(args)
    runs = result["rows"][0]["runs"]
    for v in ("hf-static-compiled", "quest-twilight-sparse-compiled"):
        assert runs[v]["compile"]["graphs"] >= 1 and runs[v]["compile"]["graph_breaks"] == 0, runs[v]["compile"]
        assert runs[v]["tokens"] == runs[v[:-len("-compiled")]]["tokens"]
    assert "compile" not in runs["hf-static"]
    assert "quest-twilight-sparse-compiled" in result["rows"][0]["speedup"]
    assert "## Compiled variants" in open(os.path.join(result["out"], "e2e.md")).read()
    with pytest.raises(SystemExit, match="unknown"):
        e2e.main(TINY + ["--variants", "hf-static,quest-compiled-typo", "--out", str(tmp_path)])
