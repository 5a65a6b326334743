"""The shared loop: resume without redoing samples, torn lines, sharding, merging, reports."""
import argparse
import json
import os

import pytest

from twilight_eval import report, runner
from twilight_eval.common import Sample
from twilight_eval.tasks.base import Task


class CountingTask(Task):
    """Scores 1 for even sample indices; remembers which (config, sample) pairs it evaluated."""
    name = "fake"

    def __init__(self, fail_after=None):
        super().__init__(argparse.Namespace())
        self.calls, self.fail_after, self.config = [], fail_after, None

    def evaluate(self, model, tokenizer, sample):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt   # an interruption in the middle of the run
        self.calls.append((model.config_name, sample.id))
        return {"prediction": "x", "score": float(int(sample.id.split("s")[-1]) % 2 == 0), "generated_tokens": 1}


class FakeModel:
    config_name = None


class FakeBackend(runner.TwilightBackend):
    """Records patching; budgets depend on the config so reports can be checked."""

    def __init__(self):
        self.events = []

    def patch(self, model, cfg):
        model.config_name = cfg
        self.events.append(("patch", cfg))

    def unpatch(self, model):
        self.events.append(("unpatch", model.config_name))

    def reset_stats(self, model):
        pass

    def engagement(self, model):  # every decode step went through Twilight
        self.steps = getattr(self, "steps", 0) + 3
        return {"decode_forwards": self.steps, "twilight_forwards": self.steps, "dense_cause": None}

    def read_stats(self, model):
        attended = 100.0 if model.config_name == "dense" else 10.0
        return {"mean_attended_tokens": attended, "mean_context_tokens": 100.0, "attended_fraction": attended / 100,
                "per_layer": [{"layer": 0, "mean_attended_tokens": attended}, {"layer": 1, "mean_attended_tokens": 50}]}


def make_samples(n=4, length=128, tag=""):
    return [Sample(id=f"t/L{length}/s{i}", task="t", length=length, input_ids=[1, 2, i], answers=[tag or "a"],
                   max_new_tokens=4, metric="string_match_all") for i in range(n)]


CONFIGS = [("dense", "dense"), ("quest-twilight", "quest-twilight")]


def test_every_pair_is_evaluated_once_and_recorded(tmp_path):
    task, backend, samples = CountingTask(), FakeBackend(), make_samples()
    assert runner.evaluate(task, FakeModel(), None, samples, CONFIGS, str(tmp_path), backend, progress=False) == 8
    assert backend.events == [("patch", "dense"), ("patch", "quest-twilight"), ("unpatch", "quest-twilight")]
    records = runner.read_records(str(tmp_path))
    assert {(r["id"], r["config"]) for r in records} == {(s.id, c) for s in samples for c, _ in CONFIGS}
    first = records[0]
    assert first["fingerprint"] == samples[0].fingerprint and first["budget"]["mean_attended_tokens"] == 100.0
    assert first["input_tokens"] == 3 and first["length"] == 128 and first["seconds"] >= 0


class DenseForQuestBackend(FakeBackend):
    """Decode steps under quest-twilight bypass Twilight (as a silently unpatched model's would)."""

    def engagement(self, model):
        self.steps = getattr(self, "steps", 0) + 3
        served = self.steps if model.config_name == "dense" else 0
        return {"decode_forwards": self.steps, "twilight_forwards": served, "dense_cause": "a foreign cache"}


def test_a_config_whose_decode_steps_bypass_twilight_is_refused(tmp_path):
    samples = make_samples()
    with pytest.raises(runner.EvalError, match=r"--configs quest-twilight: sample t/L128/s0 ran 3 decode step\(s\) "
                                               r"and none went through Twilight \(a foreign cache\)"):
        runner.evaluate(CountingTask(), FakeModel(), None, samples, CONFIGS, str(tmp_path), DenseForQuestBackend(),
                        progress=False)
    records = runner.read_records(str(tmp_path))
    assert {r["config"] for r in records} == {"dense"}  # nothing written as if quest-twilight had run


def test_check_engaged_allows_samples_without_decode_steps():
    quiet = {"decode_forwards": 5, "twilight_forwards": 2, "dense_cause": None}
    runner.check_engaged("quest-twilight", "s0", quiet, quiet)  # a one-token answer decodes nothing
    runner.check_engaged("quest-twilight", "s0", quiet, {**quiet, "decode_forwards": 9, "twilight_forwards": 6})
    with pytest.raises(runner.EvalError, match="4 decode step"):
        runner.check_engaged("quest-twilight", "s0", quiet, {**quiet, "decode_forwards": 9})


def test_an_interrupted_run_resumes_without_redoing_finished_samples(tmp_path):
    samples = make_samples()
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(CountingTask(fail_after=5), FakeModel(), None, samples, CONFIGS, str(tmp_path),
                        FakeBackend(), progress=False)
    assert len(runner.read_records(str(tmp_path))) == 5
    task = CountingTask()
    assert runner.evaluate(task, FakeModel(), None, samples, CONFIGS, str(tmp_path), FakeBackend(),
                           progress=False) == 3
    assert task.calls == [("quest-twilight", "t/L128/s1"), ("quest-twilight", "t/L128/s2"),
                          ("quest-twilight", "t/L128/s3")]
    # a third run has nothing left to do and does not even patch the model
    backend = FakeBackend()
    assert runner.evaluate(CountingTask(), FakeModel(), None, samples, CONFIGS, str(tmp_path), backend,
                           progress=False) == 0
    assert backend.events == []
    assert len(runner.read_records(str(tmp_path))) == 8


def test_a_torn_last_line_is_redone_and_does_not_corrupt_the_file(tmp_path):
    samples = make_samples(2)
    runner.evaluate(CountingTask(), FakeModel(), None, samples, CONFIGS[:1], str(tmp_path), FakeBackend(),
                    progress=False)
    path = tmp_path / runner.RESULTS_FILE
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])   # killed while writing the 2nd line
    task = CountingTask()
    runner.evaluate(task, FakeModel(), None, samples, CONFIGS[:1], str(tmp_path), FakeBackend(), progress=False)
    assert task.calls == [("dense", "t/L128/s1")]
    assert len(runner.read_records(str(tmp_path))) == 2
    for line in path.read_text().splitlines()[2:]:
        json.loads(line)


class MultiByteTask(CountingTask):
    """Predictions in Chinese: every record holds multi-byte UTF-8 characters."""

    def evaluate(self, model, tokenizer, sample):
        return {**super().evaluate(model, tokenizer, sample), "prediction": "答案是四十二" * 20}


@pytest.mark.parametrize("where", ["inside a character", "after the first record"])
def test_a_torn_line_anywhere_in_bytes_is_redone(tmp_path, where):
    """Killed mid-write, cutting a multi-byte character in two (or leaving a torn line in the middle of the file,
    as a merge of shards can): the rerun reads every complete record and redoes only the torn one."""
    samples = make_samples(3)
    runner.evaluate(MultiByteTask(), FakeModel(), None, samples, CONFIGS[:1], str(tmp_path), FakeBackend(),
                    progress=False)
    path = tmp_path / runner.RESULTS_FILE
    data = path.read_bytes()
    lines = data.split(b"\n")
    cut = lines[1].index("答".encode()) + 1  # one byte into a three-byte character
    assert lines[1][:cut].decode("utf-8", errors="replace").endswith("\ufffd")
    if where == "inside a character":
        path.write_bytes(lines[0] + b"\n" + lines[2] + b"\n" + lines[1][:cut])
    else:
        path.write_bytes(lines[0] + b"\n" + lines[1][:cut] + b"\n" + lines[2] + b"\n")
    assert [r["id"] for r in runner.read_records(str(tmp_path))] == ["t/L128/s0", "t/L128/s2"]
    task = MultiByteTask()
    runner.evaluate(task, FakeModel(), None, samples, CONFIGS[:1], str(tmp_path), FakeBackend(), progress=False)
    assert task.calls == [("dense", "t/L128/s1")]
    assert sorted(r["id"] for r in runner.read_records(str(tmp_path))) == [s.id for s in samples]


class FailingTask(CountingTask):
    """Raises on one sample, once (``fail_ids``)."""

    def __init__(self, fail_ids=()):
        super().__init__()
        self.fail_ids = set(fail_ids)

    def evaluate(self, model, tokenizer, sample):
        if sample.id in self.fail_ids:
            raise RuntimeError(f"boom on {sample.id}")
        return super().evaluate(model, tokenizer, sample)


def test_a_failing_sample_is_recorded_and_the_run_goes_on(tmp_path):
    samples = make_samples(3)
    task = FailingTask({"t/L128/s1"})
    assert runner.evaluate(task, FakeModel(), None, samples, CONFIGS, str(tmp_path), FakeBackend(),
                           progress=False) == 6
    assert len(task.calls) == 4  # every other pair ran
    records = runner.read_records(str(tmp_path))
    errors = runner.failed_records(records, samples, runner.resume_keys(CONFIGS))
    assert sorted(r["config"] for r in errors) == ["dense", "quest-twilight"]
    assert all(r["error"] == "RuntimeError: boom on t/L128/s1" and r["score"] is None for r in errors)
    kept = runner.select_records(records, samples, runner.resume_keys(CONFIGS))
    assert len(kept) == 4 and all(r["score"] is not None for r in kept)
    retry = FailingTask()  # the rerun redoes exactly the failed pairs, which now succeed
    runner.evaluate(retry, FakeModel(), None, samples, CONFIGS, str(tmp_path), FakeBackend(), progress=False)
    assert sorted(retry.calls) == [("dense", "t/L128/s1"), ("quest-twilight", "t/L128/s1")]
    records = runner.read_records(str(tmp_path))
    assert runner.failed_records(records, samples, runner.resume_keys(CONFIGS)) == []
    assert len(runner.select_records(records, samples, runner.resume_keys(CONFIGS))) == 6


def test_changed_samples_are_evaluated_again_and_old_records_are_ignored(tmp_path):
    runner.evaluate(CountingTask(), FakeModel(), None, make_samples(2, tag="old"), CONFIGS[:1], str(tmp_path),
                    FakeBackend(), progress=False)
    new = make_samples(2, tag="new")                    # same ids, different content (e.g. another seed)
    task = CountingTask()
    runner.evaluate(task, FakeModel(), None, new, CONFIGS[:1], str(tmp_path), FakeBackend(), progress=False)
    assert len(task.calls) == 2
    selected = runner.select_records(runner.read_records(str(tmp_path)), new, runner.resume_keys(CONFIGS[:1]))
    assert len(selected) == 2 and all(r["answers"] == ["new"] for r in selected)


def test_shards_split_the_samples_and_merge_back(tmp_path):
    samples = make_samples(5)
    calls = []
    for rank in range(2):
        task = CountingTask()
        runner.evaluate(task, FakeModel(), None, samples, CONFIGS[:1], str(tmp_path), FakeBackend(),
                        dist=runner.Dist(rank=rank, world=2), progress=False)
        calls.append([sid for _, sid in task.calls])
        assert os.path.exists(tmp_path / f"samples.rank{rank}.jsonl")
    assert calls == [["t/L128/s0", "t/L128/s2", "t/L128/s4"], ["t/L128/s1", "t/L128/s3"]]
    merged = runner.merge_shards(str(tmp_path))
    assert sorted(r["id"] for r in merged) == [s.id for s in samples]
    assert sorted(os.listdir(tmp_path)) == [runner.RESULTS_FILE]
    assert {r["process"] for r in merged} == {0, 1}


def test_summary_markdown_and_plots(tmp_path):
    samples = make_samples(4, 128) + make_samples(4, 256)
    runner.evaluate(CountingTask(), FakeModel(), None, samples, CONFIGS, str(tmp_path), FakeBackend(),
                    progress=False)
    records = runner.select_records(runner.read_records(str(tmp_path)), samples, runner.resume_keys(CONFIGS))
    summary = report.summarize(CountingTask(), records, ["dense", "quest-twilight"], [128, 256],
                               {"model": "m", "seed": 0, "samples_per_cell": 4})
    # samples s0 and s2 score 1, s1 and s3 score 0: 50% everywhere
    assert summary["scores"]["dense"]["t"] == {"128": 50.0, "256": 50.0}
    assert summary["average"]["quest-twilight"] == {"128": 50.0, "256": 50.0, "all": 50.0}
    assert summary["budget"]["quest-twilight"]["mean_attended_tokens"] == 10.0
    assert summary["budget"]["dense"]["attended_fraction"] == 1.0
    assert summary["budget"]["quest-twilight"]["per_layer_attended_tokens"] == [10.0, 50.0]
    table = report.markdown(summary)
    assert "| group | length | dense | quest-twilight |" in table
    assert "| t | 128 | 50.0 | 50.0 |" in table
    assert "| quest-twilight | 10.0 | 100.0 | 0.100 |" in table
    # the same scores on the same samples: a zero difference with a zero-width interval
    assert summary["vs_baseline"]["configs"]["quest-twilight"]["all"]["delta"] == 0.0
    assert "Difference from dense on the same samples" in table
    assert "| quest-twilight | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |" in table
    paths = report.write_reports(summary, str(tmp_path))
    for name in ("accuracy_vs_length", "budget", "budget_per_layer"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(open(paths["summary"]).read())["scores"] == summary["scores"]


def test_average_over_samples_and_bucket_tables():
    """LongBench v2 averages over questions, not groups; buckets print in their natural order under the task's
    title. Group a: 3 samples all right, group b: 1 sample wrong -> 75% over samples, 50% over groups."""
    def rec(i, group, bucket, score):
        return {"id": f"s{i}", "fingerprint": "f", "config": "dense", "length": 100, "group": group, "score": score,
                "meta": {"bucket": bucket}, "budget": {}}
    records = [rec(0, "a", "short", 1.0), rec(1, "a", "long", 1.0), rec(2, "a", "medium", 1.0),
               rec(3, "b", "long", 0.0)]

    class PerSample(CountingTask):
        average_over_groups = False
        buckets_title = "By length category"

    info = {"model": "m", "seed": 0, "samples_per_cell": 1}
    assert report.summarize(CountingTask(), records, ["dense"], [100], info)["average"]["dense"]["all"] == 50.0
    summary = report.summarize(PerSample(), records, ["dense"], [100], info)
    assert summary["average"]["dense"] == {"100": 75.0, "all": 75.0}
    assert summary["length_buckets"]["dense"] == {"long": 50.0, "medium": 100.0, "short": 100.0}
    table = report.markdown(summary)
    assert "By length category:" in table and "| config | short | medium | long |" in table
    assert "| dense | 100.0 | 100.0 | 50.0 |" in table


def test_configs_are_evaluated_sparse_from_the_first_step(tmp_path):
    """An evaluation measures sparsity's effect on accuracy: a preset's dense_below="auto" (the speed crossover,
    dense below ~3k tokens on a CPU) becomes 0; a JSON config that sets dense_below keeps it."""
    backend = runner.TwilightBackend()
    name, cfg = backend.load_config("quest-twilight")
    assert name == "quest-twilight" and cfg.dense_below == 0 and cfg.selector.type == "quest"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"selector": "full", "pruner": {"type": "top_p", "p": 0.9}, "dense_below": 2048}))
    _, cfg = backend.load_config(str(path))
    assert cfg.dense_below == 2048


def test_paired_differences_from_the_baseline_with_bootstrap_intervals():
    """Each config minus dense on the same samples (matched by id and fingerprint), in percentage points."""
    def rec(i, config, length, score):
        return {"id": f"s{i}", "fingerprint": f"f{i}", "config": config, "length": length, "score": score}
    dense = [rec(i, "dense", 128 if i < 6 else 256, 1.0) for i in range(10)]
    same = [rec(i, "same", r["length"], 1.0) for i, r in enumerate(dense)]
    worse = [rec(i, "worse", r["length"], 0.0 if i in (0, 7, 8) else 1.0) for i, r in enumerate(dense)]
    stranger = [rec(99, "worse", 128, 0.0)]  # no dense record for this sample: not paired
    diffs = report.paired_differences(dense + same + worse + stranger, ["dense", "same", "worse"], [128, 256])
    assert set(diffs) == {"same", "worse"}
    assert diffs["same"]["all"] == {"delta": 0.0, "low": 0.0, "high": 0.0, "samples": 10}
    w = diffs["worse"]
    assert w["all"]["samples"] == 10 and w["all"]["delta"] == pytest.approx(-30.0)
    assert w["128"]["delta"] == pytest.approx(-100 / 6, abs=1e-3) and w["256"]["delta"] == pytest.approx(-50.0)
    assert w["all"]["low"] < -30.0 < w["all"]["high"] <= 0.0  # the interval holds the mean, never above 0 here
    assert report.paired_bootstrap([1.0, 2.0], seed=3) == report.paired_bootstrap([1.0, 2.0], seed=3)


# --------------------------------------------------------------------------- resume keys

class ScoreTask(CountingTask):
    """Scores what the model says (``model.score``), so a reported score tells which run computed it."""

    def evaluate(self, model, tokenizer, sample):
        return {**super().evaluate(model, tokenizer, sample), "score": model.score}


class ScoringModel(FakeModel):
    def __init__(self, score):
        self.score = score


def context(**changes):
    return {"model": "/models/m", "weights": "w0", "dtype": "float32", "device": "cpu",
            "protocol": "decode-question", "twilight": "0.1.0", **changes}


def set_aside_lines(err):
    return [line for line in err.splitlines() if "set aside" in line]


@pytest.mark.parametrize("change", [{"weights": "w1"}, {"model": "/models/other"}, {"dtype": "bfloat16"},
                                    {"device": "cuda"}, {"protocol": "dense-prefill"}, {"twilight": "0.2.0"}])
def test_a_record_of_another_run_is_set_aside_recomputed_and_not_reported(tmp_path, capsys, change):
    samples, out = make_samples(3), str(tmp_path)
    first, second = runner.resume_keys(CONFIGS, context()), runner.resume_keys(CONFIGS, context(**change))
    assert runner.evaluate(ScoreTask(), ScoringModel(1.0), None, samples, CONFIGS, out, FakeBackend(),
                           progress=False, runs=first) == 6
    capsys.readouterr()
    task = ScoreTask()
    assert runner.evaluate(task, ScoringModel(0.0), None, samples, CONFIGS, out, FakeBackend(), progress=False,
                           runs=second) == 6
    assert len(task.calls) == 6                        # every pair ran again
    lines = set_aside_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "set aside 6 record(s)" in lines[0]
    assert f"(other {runner.RUN_FIELDS[next(iter(change))]})" in lines[0]
    records = runner.read_records(out)
    assert len(records) == 12                          # the other run's records stay in the file...
    mine = runner.select_records(records, samples, second)
    assert len(mine) == 6 and {r["score"] for r in mine} == {0.0}   # ...but are not this run's results
    assert all(r["run"] == second[r["config"]] for r in mine)
    summary = report.summarize(ScoreTask(), mine, list(second), [128], {"model": "m"})
    assert summary["average"]["dense"]["all"] == 0.0 and summary["num_records"]["dense"] == 3
    # both runs' records coexist: rerunning either one resumes everything and sets nothing aside
    for runs in (second, first):
        task = ScoreTask()
        assert runner.evaluate(task, ScoringModel(0.5), None, samples, CONFIGS, out, FakeBackend(),
                               progress=False, runs=runs) == 0
        assert task.calls == [] and set_aside_lines(capsys.readouterr().err) == []
    assert {r["score"] for r in runner.select_records(runner.read_records(out), samples, first)} == {1.0}


def test_an_edited_config_under_the_same_name_is_recomputed(tmp_path, capsys):
    """The key holds the config's settings, not its name: the edited one runs again, dense is resumed, and a
    config rebuilt with the same settings is resumed."""
    from twilight import TwilightConfig
    base = TwilightConfig.load("quest-twilight").replace(backend="torch", dense_below=0, name="mine")
    edited = TwilightConfig.load({**base.to_dict(), "pruner": {"type": "top_p", "p": 0.5}})
    samples, out, ctx = make_samples(3), str(tmp_path), context()
    before, after = [("dense", "dense"), ("mine", base)], [("dense", "dense"), ("mine", edited)]
    runner.evaluate(ScoreTask(), ScoringModel(1.0), None, samples, before, out, FakeBackend(), progress=False,
                    runs=runner.resume_keys(before, ctx))
    capsys.readouterr()
    task = ScoreTask()
    runs = runner.resume_keys(after, ctx)
    assert runs["mine"]["config"] != runner.resume_keys(before, ctx)["mine"]["config"]
    assert runner.evaluate(task, ScoringModel(0.0), None, samples, after, out, FakeBackend(), progress=False,
                           runs=runs) == 3
    assert [cfg for cfg, _ in task.calls] == [edited] * 3
    lines = set_aside_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "set aside 3 record(s)" in lines[0] and "(other config settings)" in lines[0]
    mine = runner.select_records(runner.read_records(out), samples, runs)
    assert {(r["config"], r["score"]) for r in mine} == {("dense", 1.0), ("mine", 0.0)}
    same = [("dense", "dense"), ("mine", TwilightConfig.load(edited.to_dict()).replace(name="mine"))]
    assert runner.evaluate(ScoreTask(), ScoringModel(0.5), None, samples, same, out, FakeBackend(),
                           progress=False, runs=runner.resume_keys(same, ctx)) == 0


def test_records_written_before_run_keys_are_recomputed_and_counted(tmp_path, capsys):
    samples, out = make_samples(2), str(tmp_path)
    runs = runner.resume_keys(CONFIGS, context())
    runner.evaluate(ScoreTask(), ScoringModel(1.0), None, samples, CONFIGS, out, FakeBackend(), progress=False,
                    runs=runs)
    path = tmp_path / runner.RESULTS_FILE
    old = [{k: v for k, v in json.loads(line).items() if k not in ("run", "run_key")}
           for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))   # as this version's predecessors wrote them
    assert runner.select_records(runner.read_records(out), samples, runs) == []
    capsys.readouterr()
    task = ScoreTask()
    assert runner.evaluate(task, ScoringModel(0.0), None, samples, CONFIGS, out, FakeBackend(), progress=False,
                           runs=runs) == 4
    lines = set_aside_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "set aside 4 record(s)" in lines[0]
    assert "4 written before records carried a run key" in lines[0]
    assert {r["score"] for r in runner.select_records(runner.read_records(out), samples, runs)} == {0.0}
    assert len(runner.read_records(out)) == 8


def test_merged_shards_keep_each_runs_records(tmp_path):
    samples, out = make_samples(5), str(tmp_path)
    runs = {score: runner.resume_keys(CONFIGS[:1], context(weights=f"w{score}")) for score in (1.0, 0.0)}
    for score, run in runs.items():
        for rank in range(2):
            runner.evaluate(ScoreTask(), ScoringModel(score), None, samples, CONFIGS[:1], out, FakeBackend(),
                            dist=runner.Dist(rank=rank, world=2), progress=False, runs=run)
        merged = runner.merge_shards(out)
    assert len(merged) == 10 and sorted(os.listdir(tmp_path)) == [runner.RESULTS_FILE]
    for score, run in runs.items():
        mine = runner.select_records(runner.read_records(out), samples, run)
        assert sorted(r["id"] for r in mine) == [s.id for s in samples] and {r["score"] for r in mine} == {score}


def test_summarize_refuses_several_records_of_one_pair():
    record = {"id": "s0", "fingerprint": "f", "config": "dense", "length": 100, "group": "g", "score": 1.0,
              "budget": {}}
    with pytest.raises(ValueError, match="several records"):
        report.summarize(CountingTask(), [record, {**record, "score": 0.0}], ["dense"], [100], {"model": "m"})
