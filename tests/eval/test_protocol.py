"""``--protocol``: under ``decode-question`` the prompt after the context goes through Twilight decode steps.

References: an unpatched model's teacher-forced forward (the logits every decode step must reproduce when sparse
attention keeps everything), and the count of decode steps that follows from the protocol's definition.
"""
import argparse
import json
from pathlib import Path

import pytest

from twilight_eval.cli import main as eval_main
from twilight_eval.common import Sample
from twilight_eval.tasks import longbench

LONGBENCH_DATA = Path(__file__).with_name("data") / "longbench"
SPARSE = {"selector": {"type": "quest", "token_budget": 32, "page_size": 8}, "dense_below": 0,
          "estimator": {"type": "exact"}, "pruner": {"type": "none"}}
KEEP_ALL = {"selector": {"type": "oracle_topk", "token_budget": 4096}, "dense_below": 0,
            "estimator": {"type": "exact"}, "pruner": {"type": "none"}}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, twilight_lib):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompt(tokenizer, n=200):
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, len(tokenizer) - 100, (n,), generator=g).tolist()


def _steps(twilight, model, run):
    twilight.budget_stats(model).reset()
    out = run()
    return out, twilight.budget_stats(model).as_dict()


def test_question_tokens_are_decode_steps(tiny, twilight_lib):
    """Every question token is one Twilight decode step: the steps recorded exceed dense-prefill's by exactly the
    question's length, and each of them attended sparsely."""
    from twilight_eval.modeling import generate_sample

    twilight, (model, tokenizer) = twilight_lib, tiny
    ids, start, new = _prompt(tokenizer), 150, 5
    twilight.patch(model, twilight.TwilightConfig.load(SPARSE))
    try:
        dense_prefill, d_stats = _steps(twilight, model, lambda: generate_sample(model, tokenizer, ids, None, new))
        question, q_stats = _steps(twilight, model, lambda: generate_sample(model, tokenizer, ids, start, new))
    finally:
        twilight.unpatch(model)
    assert dense_prefill.num_tokens == question.num_tokens == new
    assert d_stats["decode_steps"] == new - 1
    assert q_stats["decode_steps"] == (len(ids) - start) + new - 1
    # the question's steps saw a context of 150..199 tokens and attended at most the budget of each
    assert q_stats["max_attended_tokens"] <= 32 < q_stats["mean_context_tokens"]


def test_decode_steps_reproduce_the_teacher_forced_logits(tiny, twilight_lib):
    """With a selector that keeps every token, the question's decode steps give the logits of a plain forward over
    the whole prompt (unpatched model), position by position; a tight budget changes them (the steps are sparse)."""
    import torch

    from twilight_eval.modeling import decode_tokens, prefill

    twilight, (model, tokenizer) = twilight_lib, tiny
    ids, start = _prompt(tokenizer, 120), 100
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0].float()   # [T, V]
    results = {}
    for name, cfg in (("all", KEEP_ALL), ("sparse", SPARSE)):
        twilight.patch(model, twilight.TwilightConfig.load(cfg))
        try:
            pre = prefill(model, ids[:start])
            logits = [pre.last_logits]
            for i in range(start, len(ids) - 1):
                pre = decode_tokens(model, pre, [ids[i]])
                logits.append(pre.last_logits)
        finally:
            twilight.unpatch(model)
        results[name] = torch.stack(logits)   # predictions for positions start .. T-1
    expected = reference[start - 1:len(ids) - 1]
    torch.testing.assert_close(results["all"], expected, atol=2e-4, rtol=1e-4)
    assert (results["sparse"] - expected).abs().max() > 1e-3


def test_generate_question_refuses_a_prefill_that_is_not_a_prefix(tiny, twilight_lib):
    from twilight_eval.modeling import Prefill, generate_question

    model, tokenizer = tiny
    with pytest.raises(ValueError, match="proper prefix"):
        generate_question(model, tokenizer, Prefill([1, 2, 3], None, None), [1, 2, 3], 4)
    with pytest.raises(ValueError, match="proper prefix"):
        generate_question(model, tokenizer, Prefill([1, 9], None, None), [1, 2, 3], 4)


def test_sample_question_start_is_checked_and_fingerprinted():
    base = dict(id="x", task="t", length=10, input_ids=[1, 2, 3, 4], answers=["a"], max_new_tokens=2, metric="m")
    whole, split = Sample(**base), Sample(**base, question_start=2)
    assert (whole.protocol, whole.question_tokens, whole.prefill_ids) == ("dense-prefill", 0, [1, 2, 3, 4])
    assert (split.protocol, split.question_tokens, split.prefill_ids) == ("decode-question", 2, [1, 2])
    assert whole.fingerprint != split.fingerprint != Sample(**base, question_start=3).fingerprint
    for bad in (0, 4, 9):
        with pytest.raises(ValueError, match="question_start"):
            Sample(**base, question_start=bad)


@pytest.mark.parametrize("protocol", ["decode-question", "dense-prefill"])
def test_ruler_defaults_to_decode_question_and_records_it(protocol, tiny_model_dir, twilight_lib, tmp_path):
    """The CLI end to end: records carry the protocol and question length, and the budget statistics count one
    decode step per question token (shared prefill and separate runs alike)."""
    out = tmp_path / protocol
    args = ["ruler", "--model", str(tiny_model_dir), "--configs", "quest-twilight", "--tasks", "niah_single_1",
            "vt", "--lengths", "512", "--samples", "1", "--max-new-tokens", "4", "--no-progress", "--no-plots",
            "--out", str(out)]
    if protocol == "dense-prefill":
        args += ["--protocol", protocol]
    assert eval_main(args) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["protocol"] for r in records} == {protocol}
    for r in records:
        question = r["question_tokens"]
        assert (question > 5) if protocol == "decode-question" else (question == 0)
        assert r["budget"]["decode_steps"] == question + r["generated_tokens"] - 1
        if protocol == "decode-question":   # the question starts where the haystack ends
            assert r["input_tokens"] - question == r["meta"]["context_end"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == protocol
    assert f"protocol `{protocol}`" in (out / "results.md").read_text()


def test_dense_prefill_keeps_earlier_fingerprints(tokenizer, encoder):
    """Runs from before ``--protocol`` were dense-prefill: clearing the split gives back their fingerprints."""
    from twilight_eval.cli import apply_protocol
    from twilight_eval.tasks.ruler import RulerTask

    task = RulerTask(argparse.Namespace(tasks=["niah_single_1"], qa_dir=None))
    samples = task.build_samples(tokenizer, encoder, [512], 1, 0)
    split = samples[0].fingerprint
    assert apply_protocol(task, samples, "dense-prefill") == "dense-prefill"
    old = Sample(**{k: getattr(samples[0], k) for k in ("id", "task", "length", "input_ids", "answers",
                                                        "max_new_tokens", "metric")})
    assert samples[0].fingerprint == old.fingerprint != split


def test_longbench_question_starts_after_the_context(tokenizer, encoder):
    """The tokens from ``question_start`` are the template's text after ``{context}`` (chat tail included), and
    the context's last words come just before."""
    task = longbench.LongBenchTask(argparse.Namespace(datasets=["hotpotqa", "trec", "lcc"], longbench_e=False,
                                                      data_dir=str(LONGBENCH_DATA), data_url=""))
    samples = task.build_samples(tokenizer, encoder, [512, 1024], None, seed=0)
    rows = {}
    for name in ("hotpotqa", "trec", "lcc"):
        rows.update({(name, r.get("_id")): r for r in longbench.load_longbench(name, str(LONGBENCH_DATA))})
    for s in samples:
        assert s.question_start is not None, s.id
        row = rows[(s.task, s.meta["row_id"])]
        question = longbench.question_text(s.task, row)
        tail = tokenizer.decode(s.input_ids[s.question_start:])
        head = tokenizer.decode(s.input_ids[:s.question_start])
        assert question.strip() in tail and len(tail) < len(question) + 80, s.id   # + chat tail, a boundary char
        assert question.strip() not in head, s.id


def test_decode_question_without_a_split_is_noted(tokenizer, encoder):
    from twilight_eval.cli import apply_protocol
    from twilight_eval.tasks.base import Task

    task = Task(argparse.Namespace())
    base = dict(task="t", length=10, input_ids=[1, 2, 3, 4], answers=["a"], max_new_tokens=2, metric="m")
    samples = [Sample(id="a", **base, question_start=2), Sample(id="b", **base)]
    assert apply_protocol(task, samples, "decode-question") == "decode-question"
    assert samples[0].question_start == 2 and "1 of 2 sample(s)" in task.notes[0] and "b" in task.notes[0]
    assert apply_protocol(task, samples, None) is None
