"""Top-p against Quest at the budget top-p actually attended (``twilight_eval.matched_budget``)."""
import json
import math

import pytest

from twilight_eval import matched_budget
from twilight_eval.cli import main as eval_main


def test_matched_budget_rounds_up_to_whole_pages():
    assert [matched_budget.matched_budget(x, 16) for x in (0.5, 16, 16.01, 28.5, 33)] == [16, 16, 32, 32, 48]
    with pytest.raises(ValueError, match="mean_attended"):
        matched_budget.matched_budget(0, 16)


def _record(sample, length, score, attended, config):
    return {"id": f"t/L{length}/s{sample}", "fingerprint": f"f{sample}", "length": length, "score": score,
            "config": config, "budget": {"mean_attended_tokens": attended}}


def test_compare_pairs_samples_and_reports_the_paired_difference():
    ref = [_record(i, L, s, a, "ref") for i, (L, s, a) in enumerate([(4, 1.0, 10), (4, 1.0, 20), (8, 0.0, 30),
                                                                        (8, 1.0, 40), (8, 1.0, 50)])]
    cand = [_record(i, L, s, 32, "quest") for i, (L, s) in enumerate([(4, 0.0), (4, 1.0), (8, 1.0), (8, 0.0)])]
    table = matched_budget.compare({(r["id"], r["fingerprint"]): r for r in ref},
                                   {(r["id"], r["fingerprint"]): r for r in cand}, [4, 8])
    assert set(table) == {"4", "8", "all"}
    assert table["all"]["samples"] == 4  # sample 4 has no quest record: left out of both arms
    assert table["4"]["difference"]["delta"] == pytest.approx(50.0)   # (+100 + 0) / 2
    assert table["8"]["difference"]["delta"] == pytest.approx(0.0)    # (-100 + 100) / 2
    assert table["all"]["reference_attended"] == pytest.approx(25.0)  # samples 0..3 only
    assert table["all"]["candidate_attended"] == pytest.approx(32.0)
    d = table["all"]["difference"]
    assert d["low"] <= d["delta"] <= d["high"]
    assert "| all | 4 | 75.0 | 25.0 | 50.0 | 32.0 | +25.0 [" in matched_budget.render_markdown(table, "ref", "quest")


def test_matched_budget_end_to_end(twilight_lib, tiny_model_dir, tmp_path):
    """The Quest arm runs at the reference's mean attended tokens rounded up to pages, on the same samples."""
    ref_cfg = tmp_path / "qt-head.json"
    ref_cfg.write_text(json.dumps({"selector": {"type": "quest", "token_budget": 256, "page_size": 16, "gqa": "head"},
                                   "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85},
                                   "dense_layers": [0], "dense_below": 0}))
    ref_dir, out = tmp_path / "ref", tmp_path / "matched"
    common = ["--model", str(tiny_model_dir), "--lengths", "512", "--samples", "2", "--tasks", "niah_single_1"]
    assert eval_main(["ruler", *common, "--configs", str(ref_cfg), "--no-baseline", "--max-new-tokens", "4",
                      "--out", str(ref_dir), "--no-progress", "--no-plots"]) == 0
    ref = [json.loads(line) for line in (ref_dir / "samples.jsonl").open()]
    mean = sum(r["budget"]["mean_attended_tokens"] for r in ref) / len(ref)
    budget = 16 * math.ceil(mean / 16)
    args = ["--reference", str(ref_dir), "--reference-config", "qt-head", "--out", str(out), *common,
            "--max-new-tokens", "4", "--no-progress"]
    assert matched_budget.main(args) == 0
    data = json.loads((out / "matched.json").read_text())
    assert data["budget"] == budget and data["candidate"]["selector"] == {
        "type": "quest", "token_budget": budget, "gqa": "head", "page_size": 16}
    cand = {r["id"]: r for r in map(json.loads, (out / "samples.jsonl").open())}
    assert set(cand) == {r["id"] for r in ref}  # the same samples, paired
    row = data["table"]["all"]
    assert row["samples"] == 2
    assert row["difference"]["delta"] == pytest.approx(
        sum(100 * (r["score"] - cand[r["id"]]["score"]) for r in ref) / 2)
    assert (out / "matched.md").read_text().startswith("| length |")
    assert matched_budget.main([*args[:2], "--reference-config", "nope", *args[4:]]) == 2  # no such arm
    assert matched_budget.main([*args, "--budget", "0"]) == 2
