"""Shared prefill (one prompt run, many configs) and the selector table built on it, on the tiny model."""
import json

import pytest

from twilight_eval import selector_table
from twilight_eval.cli import main as eval_main

SPARSE = {"dense_layers": [0, 1], "dense_below": 0}


def _write(tmp_path, name, selector, pruner):
    est = "int4" if pruner["type"] == "top_p" else "exact"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"selector": selector, "estimator": {"type": est}, "pruner": pruner, **SPARSE}))
    return str(path)


def _records(path):
    return {(r["id"], r["config"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_shared_prefill_decodes_the_same_tokens(twilight_lib, tiny_model_dir, tmp_path):
    """Every config decoded from one shared prefill gives what running it from scratch gives: the same tokens,
    the same budgets (snapkv and h2o observe the shared prefill for their own config)."""
    top_p = {"type": "top_p", "p": 0.85}
    configs = [_write(tmp_path, "sparq", {"type": "sparq", "token_budget": 48, "num_channels": 4}, top_p),
               _write(tmp_path, "tidal", {"type": "tidal", "token_budget": 48, "reselection_layers": [2]},
                      {"type": "none"}),
               _write(tmp_path, "snapkv", {"type": "snapkv", "token_budget": 48, "observation_window": 16}, top_p),
               _write(tmp_path, "snapkv-w8", {"type": "snapkv", "token_budget": 48, "observation_window": 8},
                      {"type": "none"}),
               _write(tmp_path, "h2o", {"type": "h2o", "token_budget": 48}, {"type": "none"}),
               _write(tmp_path, "quest", {"type": "quest", "token_budget": 48}, top_p)]
    base = ["passkey", "--model", str(tiny_model_dir), "--configs", *configs, "--lengths", "256", "512",
            "--depths", "50", "--samples", "1", "--max-new-tokens", "6", "--no-progress", "--no-plots"]
    assert eval_main(base + ["--out", str(tmp_path / "shared")]) == 0
    assert eval_main(base + ["--out", str(tmp_path / "own"), "--no-share-prefill"]) == 0
    shared, own = _records(tmp_path / "shared" / "samples.jsonl"), _records(tmp_path / "own" / "samples.jsonl")
    assert shared.keys() == own.keys() and len(shared) == 2 * 7
    for key, r in shared.items():
        o = own[key]
        assert (r["prediction"], r["generated_tokens"]) == (o["prediction"], o["generated_tokens"]), key
        assert r["budget"]["per_head"] == o["budget"]["per_head"], key
        assert "prefill_seconds" in r and "prefill_seconds" not in o
        if r["config"] != "dense":
            assert r["budget"]["mean_attended_tokens"] < r["budget"]["mean_context_tokens"], key


def test_selector_configs_and_names():
    for selector in selector_table.SELECTORS:
        for p in (None, 0.85):
            cfg = selector_table.selector_config(selector, 256, p, channels_path="ch.json")
            assert selector_table.parse_name(cfg["name"]) == (selector, 256, p)
            assert cfg["pruner"]["type"] == ("top_p" if p else "none")
    streaming = selector_table.selector_config("streaming", 64, None)["selector"]
    assert streaming["sink_tokens"] + streaming["window"] == 64
    assert selector_table.parse_name("dense") is None
    with pytest.raises(ValueError, match="channels_path"):
        selector_table.selector_config("double_sparse", 64, None)


def test_collect_means_per_config_and_length():
    def rec(i, config, length, score, attended):
        return {"id": f"s{i}/L{length}", "config": config, "length": length, "score": score,
                "budget": {"mean_attended_tokens": attended, "mean_context_tokens": 1000.0}}
    records = [rec(0, "quest-64", 2048, 1.0, 64), rec(1, "quest-64", 2048, 0.0, 32), rec(2, "quest-64", 4096, 1.0, 10),
               rec(0, "quest-64", 2048, 0.0, 60)]  # a rerun of s0: the latest record counts
    data = selector_table.collect(records)
    row = data["configs"]["quest-64"]
    assert data["lengths"] == [2048, 4096]
    assert row["score"]["2048"] == 0.0 and row["attended"]["2048"] == 46.0 and row["samples"]["2048"] == 2
    assert row["score"]["all"] == pytest.approx(100 / 3) and row["attended"]["all"] == pytest.approx(34.0)


def test_top_p_gain_pairs_each_sample_with_the_selector_alone():
    def rec(i, config, score):
        return {"id": f"s{i}", "config": config, "length": 2048, "score": score, "budget": {}}
    records = [rec(i, "sparq-64", float(i % 2)) for i in range(4)] + [rec(i, "sparq-64-p85", 1.0) for i in range(4)]
    records += [rec(9, "sparq-64-p85", 0.0), rec(0, "dense", 1.0)]  # s9 has no pair: left out
    gain = selector_table.top_p_gain(records)
    assert set(gain) == {"sparq-64"}
    assert gain["sparq-64"]["delta"] == 50.0 and gain["sparq-64"]["samples"] == 4
    assert gain["sparq-64"]["low"] <= 50.0 <= gain["sparq-64"]["high"]
    assert "+50.0 [" in selector_table.render_markdown(selector_table.collect(records))


def test_selector_table_end_to_end(twilight_lib, tiny_model_dir, tmp_path):
    out = tmp_path / "table"
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--lengths", "512", "--tasks", "niah_single_1",
            "--depths", "50", "--budgets", "32", "--selectors", "quest", "double_sparse", "h2o", "snapkv",
            "--max-new-tokens", "4", "--no-progress"]
    assert selector_table.main(args) == 0
    data = json.loads((out / "selectors.json").read_text())
    names = {"dense"} | {f"{s}-32{t}" for s in ("quest", "double_sparse", "h2o", "snapkv") for t in ("", "-p85")}
    assert set(data["configs"]) == names
    records = [json.loads(line) for run in ("ruler", "passkey") for line in (out / run / "samples.jsonl").open()]
    for name in names:  # the table's numbers are the records' means
        rs = [r for r in records if r["config"] == name]
        assert len(rs) == 2
        assert data["configs"][name]["score"]["all"] == pytest.approx(100 * sum(r["score"] for r in rs) / 2)
    table = (out / "selectors.md").read_text()
    assert "| **dense** |" in table and "| h2o | 32 |" in table and "| double_sparse | 32 |" in table
    assert (out / "selectors.png").stat().st_size > 0
    ruler = [json.loads(line) for line in (out / "ruler" / "samples.jsonl").open()]
    foreign = {**ruler[0], "run_key": "0" * 16, "score": 1.0 - ruler[0]["score"]}   # another run's record
    with (out / "ruler" / "samples.jsonl").open("a") as f:
        f.write(json.dumps(foreign) + "\n")
    assert selector_table.main(args) == 0  # resumes: nothing is evaluated again
    assert [json.loads(line) for run in ("ruler", "passkey")
            for line in (out / run / "samples.jsonl").open()] == ruler + [foreign] + records[len(ruler):]
    assert json.loads((out / "selectors.json").read_text())["configs"] == data["configs"]   # not counted


def test_a_generation_config_that_acts_on_the_first_token_turns_sharing_off(twilight_lib, tiny_model_dir, tmp_path):
    """A repetition penalty changes generate()'s first token, which a shared prefill's argmax would not: every
    config then prefills for itself, the summary says why, and the tokens are generate()'s."""
    import shutil

    from transformers import GenerationConfig

    from twilight_eval.modeling import prefill_sharing_blocker

    model_dir = tmp_path / "penalised"
    shutil.copytree(tiny_model_dir, model_dir)
    config = GenerationConfig.from_pretrained(model_dir)
    config.repetition_penalty = 1.3
    config.save_pretrained(model_dir)
    assert prefill_sharing_blocker(type("M", (), {"generation_config": config})()) == "repetition_penalty=1.3"
    assert prefill_sharing_blocker(type("M", (), {"generation_config": GenerationConfig()})()) is None
    base = ["passkey", "--model", str(model_dir), "--configs", "quest-twilight", "--lengths", "256", "--depths", "50",
            "--samples", "1", "--max-new-tokens", "6", "--no-progress", "--no-plots", "--protocol", "dense-prefill"]
    assert eval_main(base + ["--out", str(tmp_path / "default")]) == 0
    assert eval_main(base + ["--out", str(tmp_path / "own"), "--no-share-prefill"]) == 0
    default, own = _records(tmp_path / "default" / "samples.jsonl"), _records(tmp_path / "own" / "samples.jsonl")
    assert all("prefill_seconds" not in r for r in default.values())
    assert {k: r["prediction"] for k, r in default.items()} == {k: r["prediction"] for k, r in own.items()}
    notes = json.loads((tmp_path / "default" / "summary.json").read_text())["notes"]
    assert any("repetition_penalty=1.3" in n for n in notes)
    # decode-question: the first answer token comes from generate() (the question's last token is its first step),
    # so the prefill stays shared and the tokens still equal separate runs.
    question = base[:-1] + ["decode-question"]
    assert eval_main(question + ["--out", str(tmp_path / "q-shared")]) == 0
    assert eval_main(question + ["--out", str(tmp_path / "q-own"), "--no-share-prefill"]) == 0
    shared, own = _records(tmp_path / "q-shared" / "samples.jsonl"), _records(tmp_path / "q-own" / "samples.jsonl")
    assert all("prefill_seconds" in r and r["protocol"] == "decode-question" for r in shared.values())
    assert {k: r["prediction"] for k, r in shared.items()} == {k: r["prediction"] for k, r in own.items()}
