"""``twilight eval`` resumes only its own results, one run at a time per ``--out``, and bad paths fail first.

Resume: a record is reused only under the same run key (model and weights, config settings, dtype, device,
backend, protocol, twilight's version); anything else is recomputed, said on one line, and left out of the
report. Lock: a second run into the same ``--out`` is refused with exit status 2 while the first lives; a
stale lock is taken over. Paths: ``--out`` and ``--configs`` are checked before the model loads.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from twilight_eval import modeling, outdir, runner

from .test_cli import LAUNCH, read_jsonl, run_cli

LOCK = outdir.LOCK_FILE


def passkey(model, out, *extra, configs=("dense", "quest-twilight")):
    return ["eval", "passkey", "--model", model, "--configs", *configs, "--lengths", 256, "--depths", 50,
            "--samples", 1, "--max-new-tokens", 4, "--out", out, "--no-progress", "--no-plots", *extra]


def set_aside(err):
    return [line for line in err.splitlines() if "set aside" in line]


def error_lines(err):
    return [line for line in err.splitlines() if "error:" in line]


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the run gets as far as loading a model."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(modeling, "load_model", load_model)


# --------------------------------------------------------------------------- resume keys, end to end

def test_another_model_sharing_the_tokenizer_is_recomputed(capsys, twilight_lib, tiny_model_dir,
                                                          other_tiny_model_dir, tmp_path):
    """The reported results are the second model's, exactly as in a fresh directory; the first model's
    records (here given a perfect score, as a real model could have) stay in the file but are not reported."""
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    status, _, err = run_cli(passkey(tiny_model_dir, shared), capsys)
    assert status == 0, err
    first = read_jsonl(shared / "samples.jsonl")
    assert len(first) == 2
    (shared / "samples.jsonl").write_text("".join(json.dumps({**r, "score": 1.0}) + "\n" for r in first))

    status, out, err = run_cli(passkey(other_tiny_model_dir, shared), capsys)
    assert status == 0, err
    lines = set_aside(err)
    assert len(lines) == 1 and "set aside 2 record(s)" in lines[0]
    assert "(other --model, model weights)" in lines[0]
    records = read_jsonl(shared / "samples.jsonl")
    assert len(records) == 4 and records[:2] == [{**r, "score": 1.0} for r in first]   # kept, and 2 new ones
    second = records[2:]
    assert {r["run"]["weights"] for r in second}.isdisjoint({r["run"]["weights"] for r in first})
    assert [r["prediction"] for r in second] != [r["prediction"] for r in first]   # other weights, other text

    status, fresh_out, err = run_cli(passkey(other_tiny_model_dir, fresh), capsys)
    assert status == 0, err
    assert set_aside(err) == []
    again = read_jsonl(fresh / "samples.jsonl")
    assert [(r["prediction"], r["run_key"]) for r in again] == [(r["prediction"], r["run_key"]) for r in second]
    reported, expected = summary(shared), summary(fresh)
    assert reported["scores"] == expected["scores"] and reported["num_records"] == {"dense": 1, "quest-twilight": 1}
    assert reported["average"]["dense"]["all"] == 0.0      # not the first model's 100
    assert reported["runs"] == expected["runs"]
    assert reported["runs"]["dense"]["model"] == os.path.realpath(other_tiny_model_dir)
    assert out.split("\n", 1)[1] == fresh_out.split("\n", 1)[1]    # the same table, but for the model line


def test_an_edited_config_under_the_same_name_is_recomputed(capsys, twilight_lib, tiny_model_dir, tmp_path):
    mine = tmp_path / "mine.json"
    settings = {"selector": {"type": "quest", "token_budget": 64, "page_size": 16}, "estimator": "int4",
                "pruner": {"type": "top_p", "p": 0.85}, "dense_below": 0}
    mine.write_text(json.dumps(settings))
    args = passkey(tiny_model_dir, tmp_path / "out", configs=("dense", mine))
    status, _, err = run_cli(args, capsys)
    assert status == 0, err
    before = summary(tmp_path / "out")

    mine.write_text(json.dumps({**settings, "pruner": {"type": "top_p", "p": 0.3}}))   # same name, edited
    status, _, err = run_cli(args, capsys)
    assert status == 0, err
    lines = set_aside(err)
    assert len(lines) == 1 and "set aside 1 record(s)" in lines[0] and "(other config settings)" in lines[0]
    records = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert [r["config"] for r in records] == ["dense", "mine", "mine"]    # dense was resumed, mine recomputed
    after = summary(tmp_path / "out")
    assert after["config_settings"]["mine"]["pruner"]["p"] == 0.3
    assert before["config_settings"]["mine"]["pruner"]["p"] == 0.85
    assert after["runs"]["mine"]["run_key"] == records[2]["run_key"] != records[1]["run_key"]
    assert after["runs"]["dense"] == before["runs"]["dense"]

    mine.write_text(json.dumps(settings, indent=4))      # the first settings again, written differently
    status, _, err = run_cli(args, capsys)
    assert status == 0 and set_aside(err) == []
    assert len(read_jsonl(tmp_path / "out" / "samples.jsonl")) == 3    # its records are found: nothing ran


def test_another_dtype_is_recomputed(capsys, twilight_lib, tiny_model_dir, tmp_path):
    args = passkey(tiny_model_dir, tmp_path, "--no-baseline", configs=("dense", "quest"))
    status, _, err = run_cli([*args, "--dtype", "float32"], capsys)
    assert status == 0, err
    status, _, err = run_cli([*args, "--dtype", "bfloat16"], capsys)
    assert status == 0, err
    lines = set_aside(err)
    assert len(lines) == 1 and "set aside 2 record(s)" in lines[0] and "(other model weights, dtype)" in lines[0]
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert [r["run"]["dtype"] for r in records] == ["float32"] * 2 + ["bfloat16"] * 2
    assert {r["dtype"] for r in summary(tmp_path)["runs"].values()} == {"bfloat16"}
    status, _, err = run_cli([*args, "--dtype", "float32"], capsys)    # back to float32: its records resume
    assert status == 0 and set_aside(err) == [] and len(read_jsonl(tmp_path / "samples.jsonl")) == 4
    assert {r["dtype"] for r in summary(tmp_path)["runs"].values()} == {"float32"}


def test_the_run_key_holds_backend_device_protocol_and_version(capsys, twilight_lib, tiny_model_dir, tmp_path):
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path, configs=("quest-twilight",)), capsys)
    assert status == 0, err
    run = read_jsonl(tmp_path / "samples.jsonl")[0]["run"]
    assert set(run) == {"model", "weights", "dtype", "device", "protocol", "twilight", "config", "backend"}
    from twilight.backends import resolve_backend
    assert run["device"] == "cpu" and run["protocol"] == "decode-question"
    assert run["twilight"] == twilight_lib.__version__ and run["backend"] == resolve_backend("auto", "cpu").name
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path, "--protocol", "dense-prefill",
                                     configs=("quest-twilight",)), capsys)
    assert status == 0, err
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 4   # other protocol: other samples and run, all new


def test_weights_fingerprint(tiny_model_dir, other_tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    def load(path, dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    a = runner.weights_fingerprint(load(tiny_model_dir))
    assert a == runner.weights_fingerprint(load(tiny_model_dir))           # stable across loads
    assert a != runner.weights_fingerprint(load(other_tiny_model_dir))     # same architecture, other weights
    assert a != runner.weights_fingerprint(load(tiny_model_dir, torch.bfloat16))
    model = load(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0             # one sampled value changed
    assert a != runner.weights_fingerprint(model)


# --------------------------------------------------------------------------- one run per --out

def _lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                        "started": "2026-01-01T00:00:00", "command": "twilight eval passkey"}))


def test_a_lock_of_a_live_process_refuses_the_run(capsys, tiny_model_dir, tmp_path, no_model_load):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, sleeper.pid)
        status, _, err = run_cli(passkey(tiny_model_dir, tmp_path), capsys)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert status == 2
    assert len(error_lines(err)) == 1 and f"pid {sleeper.pid} on {socket.gethostname()}" in error_lines(err)[0]
    assert error_lines(err)[0].startswith(f"twilight eval passkey: error: --out {tmp_path}: another twilight eval")
    assert outdir.read_owner(str(tmp_path / LOCK))["pid"] == sleeper.pid      # left to its owner
    assert not (tmp_path / "samples.jsonl").exists()


def test_a_lock_held_by_a_running_process_refuses_the_run(capsys, tiny_model_dir, tmp_path, no_model_load):
    """The holder takes the lock through ``OutLock`` (as ``twilight eval`` does) and keeps it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom twilight_eval.outdir import OutLock\n"
                               "OutLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = run_cli(passkey(tiny_model_dir, tmp_path), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert status == 2 and len(error_lines(err)) == 1 and f"pid {holder.pid} " in error_lines(err)[0]


def test_a_stale_lock_is_taken_over(capsys, twilight_lib, tiny_model_dir, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(tmp_path, gone.pid)
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path), capsys)
    assert status == 0, err
    assert f"took over the lock of pid {gone.pid} on {socket.gethostname()}, which no longer runs" in err
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 2
    assert not (tmp_path / LOCK).exists()     # released at the end


def test_a_lock_from_another_host_is_not_taken_over(capsys, tiny_model_dir, tmp_path, no_model_load):
    _lock(tmp_path, 1, host="some-other-host")
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path), capsys)
    assert status == 2 and "pid 1 on some-other-host" in error_lines(err)[0] and str(tmp_path / LOCK) in err


def test_the_lock_is_released_when_the_run_fails(capsys, twilight_lib, tiny_model_dir, tmp_path):
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path, "--lengths", 4096), capsys)
    assert status == 2 and "--lengths 4096" in err
    assert not (tmp_path / LOCK).exists()


def test_two_runs_started_together_into_one_out(twilight_lib, tiny_model_dir, tmp_path):
    """One runs, the other is refused at once (exit status 2, naming the first's pid): every record once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(LAUNCH), *map(str, passkey(tiny_model_dir, tmp_path))]
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    done = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in runs]
    assert sorted(rc for *_, rc in done) == [0, 2], [err[-2000:] for _, _, err, _ in done]
    (winner, *_), (_, _, refused, _) = sorted(done, key=lambda d: d[3])
    assert len(error_lines(refused)) == 1 and f"pid {winner} " in error_lines(refused)[0]
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert sorted(r["config"] for r in records) == ["dense", "quest-twilight"]
    assert not (tmp_path / LOCK).exists()


def test_out_lock_unit(tmp_path):
    lock = outdir.OutLock(str(tmp_path), command="first")
    assert lock.acquire() is None and lock.held
    owner = outdir.read_owner(str(tmp_path / LOCK))
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["command"] == "first"
    second = outdir.OutLock(str(tmp_path), command="second")
    if outdir.fcntl is not None:      # the same process, another open file: the flock refuses it
        with pytest.raises(outdir.EvalError, match=f"pid {os.getpid()} "):
            second.acquire()
    lock.release()
    assert not (tmp_path / LOCK).exists() and not lock.held
    with second:
        assert outdir.read_owner(str(tmp_path / LOCK))["command"] == "second"
    assert not (tmp_path / LOCK).exists()


def test_pid_alive():
    assert outdir.pid_alive(os.getpid())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not outdir.pid_alive(gone.pid) and not outdir.pid_alive(0)


# --------------------------------------------------------------------------- bad paths fail first

def test_out_that_is_a_file(capsys, tiny_model_dir, tmp_path, no_model_load):
    path = tmp_path / "results.txt"
    path.write_text("not a directory")
    status, _, err = run_cli(passkey(tiny_model_dir, path), capsys)
    assert status == 2 and error_lines(err) == [
        f"twilight eval passkey: error: --out {path}: exists and is a file, not a directory; give a directory"]
    assert path.read_text() == "not a directory"


def test_out_that_cannot_be_created(capsys, tiny_model_dir, tmp_path, no_model_load):
    parent = tmp_path / "a-file"
    parent.write_text("")
    out = parent / "results" / "passkey"
    status, _, err = run_cli(passkey(tiny_model_dir, out), capsys)
    assert status == 2 and error_lines(err) == [
        f"twilight eval passkey: error: --out {out}: cannot be created: {parent} is a file, not a directory"]


def _deny_writes_under(monkeypatch, root):
    real = os.access

    def access(path, mode, *args, **kwargs):   # as a non-root user sees a read-only directory
        if mode & os.W_OK and os.path.abspath(path).startswith(str(root)):
            return False
        return real(path, mode, *args, **kwargs)
    monkeypatch.setattr(outdir.os, "access", access)


def test_read_only_out(capsys, tiny_model_dir, tmp_path, monkeypatch, no_model_load):
    _deny_writes_under(monkeypatch, tmp_path)
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path), capsys)
    assert status == 2 and error_lines(err) == [
        f"twilight eval passkey: error: --out {tmp_path}: the directory is not writable"]
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path / "new"), capsys)
    assert status == 2 and error_lines(err) == [
        f"twilight eval passkey: error: --out {tmp_path / 'new'}: cannot be created: {tmp_path} is not writable"]
    assert os.listdir(tmp_path) == []


def test_read_only_results_file(capsys, tiny_model_dir, tmp_path, monkeypatch, no_model_load):
    (tmp_path / "samples.jsonl").write_text("")
    _deny_writes_under(monkeypatch, tmp_path / "samples.jsonl")
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path), capsys)
    assert status == 2 and error_lines(err) == [
        f"twilight eval passkey: error: --out {tmp_path}: samples.jsonl in it is read-only"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_out_for_real(capsys, tiny_model_dir, tmp_path, no_model_load):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        status, _, err = run_cli(passkey(tiny_model_dir, out), capsys)
    finally:
        out.chmod(0o755)
    assert status == 2 and len(error_lines(err)) == 1 and "not writable" in err


def test_prepare_out_dir_creates_nested_directories(tmp_path):
    out = tmp_path / "a" / "b"
    outdir.prepare_out_dir(str(out), ("samples.jsonl",))
    assert out.is_dir()
    outdir.prepare_out_dir(str(out), ("samples.jsonl",))   # an existing writable directory is fine
    (out / "samples.jsonl").mkdir()
    with pytest.raises(outdir.EvalError, match="samples.jsonl in it is a directory"):
        outdir.prepare_out_dir(str(out), ("samples.jsonl",))


@pytest.mark.parametrize("content, needle", [('{"pruner": {"type": "top_p",\n "p": 0.9,}}', "line 2, column 11"),
                                             ("", "line 1, column 1")])
def test_malformed_config_file(capsys, tiny_model_dir, tmp_path, no_model_load, content, needle):
    bad = tmp_path / "mine.json"
    bad.write_text(content)
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path / "out", configs=(bad,)), capsys)
    assert status == 2 and len(error_lines(err)) == 1
    line = error_lines(err)[0]
    assert line.startswith(f"twilight eval passkey: error: --configs {bad}: config file '{bad}' is not valid JSON")
    assert needle in line and not (tmp_path / "out").exists()


def test_config_path_that_is_a_directory(capsys, tiny_model_dir, tmp_path, no_model_load):
    folder = tmp_path / "configs.json"
    folder.mkdir()
    status, _, err = run_cli(passkey(tiny_model_dir, tmp_path / "out", configs=(folder,)), capsys)
    assert status == 2 and len(error_lines(err)) == 1 and "is a directory" in error_lines(err)[0]

