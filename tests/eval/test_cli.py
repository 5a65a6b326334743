"""``twilight eval``: bad inputs fail with one clear line (exit 2); real runs end to end on a tiny model."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from twilight.cli import main

LAUNCH = Path(__file__).with_name("_launch.py")
LONGBENCH_DATA = Path(__file__).with_name("data") / "longbench"


def run_cli(args, capsys):
    """``(exit status, stdout, stderr)`` of ``twilight <args>``, argparse exits included."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def last_line(text):
    return text.strip().splitlines()[-1]


# --------------------------------------------------------------------------- bad inputs

def test_unknown_task(capsys):
    status, _, err = run_cli(["eval", "mmlu"], capsys)
    assert status == 2
    from twilight_eval.tasks import TASKS
    assert "argument TASK: invalid choice: 'mmlu' (choose from " + ", ".join(f"'{t}'" for t in TASKS) + ")" in err


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "argument --samples: must be a positive integer, got 0"),
    (["--lengths", "4k"], "argument --lengths: must be a positive integer, got '4k'"),
    (["--depths", "120"], "argument --depths: must be between 0 and 100, got 120"),
    (["--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
])
def test_bad_arguments(capsys, args, message):
    status, _, err = run_cli(["eval", "passkey", *args], capsys)
    assert status == 2 and message in last_line(err)


def test_unknown_ruler_task(capsys):
    status, _, err = run_cli(["eval", "ruler", "--tasks", "niah_single_9"], capsys)
    assert status == 2 and "argument --tasks: invalid choice: 'niah_single_9'" in err


def test_unknown_config(capsys, twilight_lib, tiny_model_dir):
    status, _, err = run_cli(["eval", "passkey", "--model", tiny_model_dir, "--configs", "quest-twilite"], capsys)
    assert status == 2
    line = last_line(err)
    assert line.startswith("twilight eval passkey: error: --configs quest-twilite:")
    assert "quest-twilite" in line and "Loading" not in err   # rejected before the model is loaded


def test_bad_config_file(capsys, twilight_lib, tmp_path):
    bad = tmp_path / "mine.json"
    bad.write_text(json.dumps({"no_such_field": 1}))
    status, _, err = run_cli(["eval", "ppl", "--configs", bad], capsys)
    assert status == 2 and last_line(err).startswith(f"twilight eval ppl: error: --configs {bad}:")


def test_lengths_beyond_the_models_context(capsys, twilight_lib, tiny_model_dir, tmp_path):
    status, _, err = run_cli(["eval", "ruler", "--model", tiny_model_dir, "--lengths", 512, 2048, 4096,
                              "--out", tmp_path], capsys)
    assert status == 2
    assert last_line(err) == (f"twilight eval ruler: error: --lengths 2048 4096: longer than the maximum context of "
                              f"{tiny_model_dir} (1024 tokens, max_position_embeddings)")


def test_missing_metric_dependency_fails_before_the_model_loads(capsys, twilight_lib, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge" else real(name, *a))
    status, _, err = run_cli(["eval", "longbench", "--model", tmp_path / "no-such-model", "--datasets", "gov_report",
                              "--data-dir", LONGBENCH_DATA], capsys)
    assert status == 2
    assert "pip install rouge" in last_line(err)  # not the model's load error


def test_unloadable_model(capsys, twilight_lib, tmp_path):
    status, _, err = run_cli(["eval", "passkey", "--model", tmp_path / "nowhere"], capsys)
    assert status == 2 and "error: --model: cannot load" in last_line(err)


# --------------------------------------------------------------------------- end to end

def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_passkey_end_to_end_and_resume(capsys, twilight_lib, tiny_model_dir, tmp_path):
    args = ["eval", "passkey", "--model", tiny_model_dir, "--configs", "dense", "quest-twilight",
            "--lengths", 256, 512, "--depths", 0, 100, "--samples", 1, "--out", tmp_path, "--no-progress"]
    status, out, err = run_cli(args, capsys)
    assert status == 0, err
    assert "| group | length | dense | quest-twilight |" in out and "| depth 100% | 512 |" in out
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert len(records) == 2 * 2 * 2
    assert {r["config"] for r in records} == {"dense", "quest-twilight"}
    sparse = [r["budget"] for r in records if r["config"] == "quest-twilight"]
    assert all(b["decode_steps"] > 0 for b in sparse)  # Twilight really decoded
    assert all(b["mean_attended_tokens"] <= b["mean_context_tokens"] for b in sparse)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["configs"] == ["dense", "quest-twilight"] and summary["lengths"] == [256, 512]
    assert summary["average"]["dense"]["all"] is not None
    for name in ("results.md", "accuracy_vs_length.png", "budget.png"):
        assert (tmp_path / name).stat().st_size > 0
    before = (tmp_path / "samples.jsonl").read_text()

    status, out, _ = run_cli(args, capsys)        # resume: everything is done already
    assert status == 0 and "| depth 0% | 256 |" in out
    assert (tmp_path / "samples.jsonl").read_text() == before


def test_a_sparse_config_that_never_engages_fails(capsys, twilight_lib, tiny_model_dir, tmp_path, monkeypatch):
    """A patch that is bypassed (here: the attention implementation switched back after patching) must not be
    scored as if the sparse config had run."""
    from twilight_eval import runner

    patch = runner.TwilightBackend.patch

    def patch_then_bypass(self, model, cfg):
        patch(self, model, cfg)
        model.set_attn_implementation("sdpa")

    monkeypatch.setattr(runner.TwilightBackend, "patch", patch_then_bypass)
    args = ["eval", "passkey", "--model", tiny_model_dir, "--configs", "quest-twilight", "--lengths", 256,
            "--depths", 50, "--samples", 1, "--out", tmp_path, "--no-progress"]
    with pytest.warns(RuntimeWarning, match="_attn_implementation was changed"):
        status, out, err = run_cli(args, capsys)
    assert status != 0
    line = last_line(err)
    # the CLI always runs dense (patched with the dense preset) beside the configs: it is refused first
    assert line.startswith("twilight eval passkey: error: --configs dense: sample passkey/L256/")
    assert "none went through Twilight" in line and "_attn_implementation was changed" in line
    assert not (tmp_path / "samples.jsonl").exists() or not read_jsonl(tmp_path / "samples.jsonl")
    assert not (tmp_path / "summary.json").exists()


def test_ruler_ppl_longbench_end_to_end(capsys, twilight_lib, tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--configs", "quest-twilight", "--samples", 1, "--no-progress",
              "--no-plots"]
    mine = tmp_path / "my-twilight.json"           # a JSON config next to a preset
    twilight_lib.TwilightConfig.load("twilight").save(mine)
    status, out, err = run_cli(["eval", "ruler", "--tasks", "niah_single_1", "vt", "fwe", "--lengths", 512,
                                "--max-new-tokens", 4, "--out", tmp_path / "ruler", *common, "--configs",
                                "quest-twilight", mine], capsys)
    assert status == 0, err
    records = read_jsonl(tmp_path / "ruler" / "samples.jsonl")
    assert len(records) == 3 * 3 and all(r["generated_tokens"] <= 4 for r in records)
    assert {r["config"] for r in records} == {"dense", "quest-twilight", "my-twilight"}
    assert "| group | length | dense | quest-twilight | my-twilight |" in out
    assert "| **average** | 512 |" in out

    status, out, err = run_cli(["eval", "ppl", "--lengths", 256, "--decode-tokens", 8,
                                "--out", tmp_path / "ppl", *common], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "ppl" / "summary.json").read_text())
    assert summary["score"] == "perplexity" and not summary["higher_is_better"]
    for config in ("dense", "quest-twilight"):
        assert summary["average"][config]["256"] > 1.0
    assert all(r["scored_tokens"] == 8 for r in read_jsonl(tmp_path / "ppl" / "samples.jsonl"))

    status, out, err = run_cli(["eval", "longbench", "--data-dir", LONGBENCH_DATA, "--datasets", "hotpotqa",
                                "trec", "lcc", "passage_count", "--lengths", 512, "--max-new-tokens", 4,
                                "--out", tmp_path / "lb", "--model", tiny_model_dir, "--configs", "quest-twilight",
                                "--no-progress", "--no-plots"], capsys)
    assert status == 0, err
    assert "| trec | 512 |" in out and "| lcc | 512 |" in out
    assert len(read_jsonl(tmp_path / "lb" / "samples.jsonl")) == 5 * 2
    assert "| passage_count | 512 |" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_with_two_cpu_processes(twilight_lib, tiny_model_dir, tmp_path):
    """``accelerate launch`` with two processes: each evaluates a shard, the main one merges."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(LAUNCH), "eval", "passkey", "--model", str(tiny_model_dir), "--lengths", "256",
           "--depths", "0", "50", "100", "--out", str(tmp_path), "--no-progress", "--no-plots"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert len(records) == 3 * 2
    assert {r["process"] for r in records} == {0, 1}
    assert sorted(p.name for p in tmp_path.glob("samples*.jsonl")) == ["samples.jsonl"]
    assert json.loads((tmp_path / "summary.json").read_text())["processes"] == 2
    assert done.stdout.count("| group | length | dense | quest-twilight |") == 1   # printed once
