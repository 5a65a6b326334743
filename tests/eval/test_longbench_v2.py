"""LongBench v2 on a tiny local data file in the benchmark's own format (the hub is not reachable here)."""
import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from twilight_eval.common import EvalError, PromptEncoder
from twilight_eval.tasks import TASKS
from twilight_eval.tasks import longbench_v2 as lb2

DATA = Path(__file__).with_name("data") / "longbench_v2" / "data.json"
# prompts/0shot.txt of THUDM/LongBench (LongBench v2), filled for the first row of DATA
FIRST_PROMPT = ("Please read the following text and answer the question below.\n\n<text>\nThe lighthouse keeper lived "
                "in a small cottage at the foot of the tower. Its door was painted blue every spring, when the storms "
                "had passed. Visitors often remarked on the colour.\n</text>\n\nWhat is the correct answer to this "
                "question: What colour is the door of the lighthouse keeper's cottage?\nChoices:\n(A) Red\n(B) Blue\n"
                "(C) Green\n(D) Yellow\n\nFormat your response as follows: \"The correct answer is (insert answer "
                "here)\".")
AFTER_DOCUMENT = "</text>\n\nWhat is the correct answer to this question:"


def task(data_file=DATA):
    return lb2.LongBenchV2Task(argparse.Namespace(data_file=str(data_file) if data_file else None))


def rows():
    return json.loads(DATA.read_text())


def write_rows(path, items, jsonl=False):
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in items)
        else:
            json.dump(items, f)
    return path


def long_row(context_sentences=400, question_words=0):
    row = dict(rows()[0], _id="long-0")
    row["context"] = "HEAD OF THE BOOK. " + " ".join(f"Sentence {i} of the middle." for i in range(context_sentences)) \
        + " END OF THE BOOK."
    if question_words:
        row["question"] = "Consider " + " ".join(f"q{i}" for i in range(question_words)) + ": which colour?"
    return row


def test_registered_as_a_cli_task():
    assert TASKS["longbench-v2"] is lb2.LongBenchV2Task


def test_prompt_is_the_benchmarks_template_with_question_and_choices(tokenizer, encoder):
    assert lb2.build_prompt(rows()[0]) == FIRST_PROMPT
    samples = task().build_samples(tokenizer, encoder, [1024], None, seed=0)
    assert [s.id for s in samples] == [f"longbench-v2/lb2-{i}/L1024" for i in range(4)]
    text = tokenizer.decode(samples[0].input_ids)
    assert text.startswith("<|im_start|>system")                                  # the chat template
    assert f"<|im_start|>user\n{FIRST_PROMPT}<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert [s.answers for s in samples] == [["B"], ["A"], ["D"], ["B"]]
    assert {s.max_new_tokens for s in samples} == {128}
    assert all(s.input_tokens + s.max_new_tokens <= 1024 and not s.meta["truncated"] for s in samples)


def test_long_prompts_are_truncated_in_the_middle(tokenizer, encoder, tmp_path):
    t = task(write_rows(tmp_path / "data.json", [long_row()]))
    (s,) = t.build_samples(tokenizer, encoder, [512], None, seed=0)
    assert 512 - 8 <= s.input_tokens + s.max_new_tokens <= 512
    assert s.meta["truncated"]
    text = tokenizer.decode(s.input_ids)
    assert "Please read the following text and answer the question below.\n\n<text>\nHEAD OF THE BOOK." in text
    assert "Sentence 0 of the middle." in text and "Sentence 399 of the middle. END OF THE BOOK.\n</text>" in text
    assert "Sentence 200 of the middle." not in text                             # the middle is gone
    assert "(D) Yellow\n\nFormat your response as follows:" in text and text.endswith("<|im_start|>assistant\n")


def test_truncate_middle_keeps_both_halves(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(400))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text, tail = lb2.truncate_middle(tokenizer, prompt, ids, 100)
    assert text.startswith("w0 w1") and text.endswith("w398 w399") and text.endswith(tail)
    assert len(tokenizer(tail, add_special_tokens=False)["input_ids"]) <= 51
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 102
    assert lb2.truncate_middle(tokenizer, "short text", [1, 2], 100) == ("short text", "short text")


@pytest.mark.parametrize("chat", ["auto", "off"])
def test_question_start_is_where_the_part_after_the_document_begins(tokenizer, tmp_path, chat):
    encoder = PromptEncoder(tokenizer, chat)
    t = task(write_rows(tmp_path / "data.json", [*rows(), long_row()]))
    samples = t.build_samples(tokenizer, encoder, [512], None, seed=0)
    assert samples[-1].meta["truncated"]
    for s in samples:
        assert s.question_start is not None and s.protocol == "decode-question"
        question = tokenizer.decode(s.input_ids[s.question_start:])
        assert question.lstrip("\n").startswith(AFTER_DOCUMENT), question[:80]
        assert "(A) " in question and question.endswith("assistant\n" if encoder.chat else '(insert answer here)".')
        assert AFTER_DOCUMENT not in tokenizer.decode(s.input_ids[:s.question_start])   # the context ends before
        assert "</" not in tokenizer.decode(s.input_ids[s.question_start - 1:s.question_start])   # nor later
    assert t.notes == []


def test_a_question_cut_by_the_truncation_is_prefilled_whole(tokenizer, encoder, tmp_path):
    t = task(write_rows(tmp_path / "data.json", [long_row(question_words=600)]))
    (s,) = t.build_samples(tokenizer, encoder, [512], None, seed=0)
    assert s.input_tokens + s.max_new_tokens <= 512
    assert s.question_start is None and s.protocol == "dense-prefill"
    assert "cut into the question" in s.meta["note"]
    assert len(t.notes) == 1 and "longbench-v2/long-0/L512" in t.notes[0]


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B)", "B"),
    ("The correct answer is C", "C"),
    ("**The correct answer is (D)**", "D"),                  # bold marks are dropped first
    ("The correct answer is (A) or maybe (B).", "A"),
    ("Reasoning first. The correct answer is B, because ...", "B"),
    ("The answer is (B)", None),
    ("the correct answer is (B)", None),                     # case-sensitive, as upstream
    ("The correct answer is (E)", None),
    ("B", None),
    ("", None),
])
def test_answer_extraction_follows_the_upstream_regexes(response, letter):
    assert lb2.extract_answer(response) == letter


def test_scoring_is_exact_match_of_the_extracted_letter(tokenizer, encoder):
    t = task()
    sample = t.build_samples(tokenizer, encoder, [1024], None, seed=0)[0]      # answer B
    out = SimpleNamespace(text=" The correct answer is (B).\n", num_tokens=9)
    assert t.score_generation(sample, out) == {"prediction": "The correct answer is (B).", "choice": "B",
                                               "score": 1.0, "generated_tokens": 9}
    assert t.score_generation(sample, SimpleNamespace(text="The correct answer is A", num_tokens=5))["score"] == 0.0
    garbage = t.score_generation(sample, SimpleNamespace(text="Blue, the door is blue.", num_tokens=7))
    assert garbage["choice"] is None and garbage["score"] == 0.0


def test_groups_are_difficulties_and_buckets_length_categories(tokenizer, encoder):
    samples = task().build_samples(tokenizer, encoder, [768, 1024], None, seed=0)
    assert [(s.group, s.meta["bucket"], s.length) for s in samples] == [
        ("easy", "short", 768), ("easy", "short", 1024), ("hard", "medium", 768), ("hard", "medium", 1024),
        ("hard", "long", 768), ("hard", "long", 1024), ("easy", "short", 768), ("easy", "short", 1024)]
    assert samples[2].meta["domain"] == "Multi-Document QA" and samples[2].meta["sub_domain"] == "Financial"


def test_jsonl_and_seeded_subsets(tokenizer, encoder, tmp_path):
    full = task().build_samples(tokenizer, encoder, [1024], None, seed=0)
    jsonl = task(write_rows(tmp_path / "data.jsonl", rows(), jsonl=True)).build_samples(tokenizer, encoder, [1024],
                                                                                          None, seed=0)
    assert [(s.id, s.fingerprint) for s in jsonl] == [(s.id, s.fingerprint) for s in full]
    a = task().build_samples(tokenizer, encoder, [1024], 2, seed=3)
    b = task().build_samples(tokenizer, encoder, [1024], 2, seed=3)
    assert len(a) == 2 and [s.id for s in a] == [s.id for s in b]
    assert [s.meta["row"] for s in a] == sorted(s.meta["row"] for s in a)          # file order
    assert len({tuple(s.id for s in task().build_samples(tokenizer, encoder, [1024], 2, seed=k))
                for k in range(6)}) > 1


def test_bad_inputs_are_clear_errors(tokenizer, encoder, tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=r"--data-file: .*missing.json not found"):
        task(tmp_path / "missing.json").check_arguments()
    broken = dict(rows()[0])
    del broken["choice_C"]
    with pytest.raises(EvalError, match=r"--data-file: row 1 of .* lacks choice_C"):
        task(write_rows(tmp_path / "a.json", [rows()[0], broken])).build_samples(tokenizer, encoder, [1024], None, 0)
    with pytest.raises(EvalError, match=r"has answer 'E', not A, B, C or D"):
        task(write_rows(tmp_path / "b.json", [dict(rows()[0], answer="E")])).build_samples(tokenizer, encoder,
                                                                                            [1024], None, 0)
    (tmp_path / "c.json").write_text("[{\"_id\": ")
    with pytest.raises(EvalError, match=r"is neither a JSON list nor JSONL"):
        task(tmp_path / "c.json").build_samples(tokenizer, encoder, [1024], None, 0)
    with pytest.raises(EvalError, match=r"--lengths 100 is too short"):
        task().build_samples(tokenizer, encoder, [100], None, 0)
    monkeypatch.setattr(lb2, "hub_reachable", lambda timeout=3.0: (False, "huggingface.co unreachable (test)"))
    monkeypatch.setattr(lb2, "offline_mode", lambda: False)
    with pytest.raises(EvalError, match=r"cannot load THUDM/LongBench-v2 from the hub: huggingface.co unreachable "
                                        r"\(test\); .*pass --data-file PATH"):
        task(data_file=None).build_samples(tokenizer, encoder, [1024], None, 0)


def test_cli_end_to_end(capsys, twilight_lib, tiny_model_dir, tmp_path):
    from twilight.cli import main

    args = ["eval", "longbench-v2", "--data-file", DATA, "--model", tiny_model_dir, "--configs", "quest-twilight",
            "--lengths", 512, "--max-new-tokens", 4, "--out", tmp_path, "--no-progress", "--no-plots"]
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "| easy | 512 |" in out and "| hard | 512 |" in out
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 2 and {r["config"] for r in records} == {"dense", "quest-twilight"}
    for r in records:
        assert r["score"] in (0.0, 1.0) and "choice" in r and r["generated_tokens"] <= 4
        assert r["protocol"] == "decode-question" and r["question_tokens"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "longbench-v2" and summary["groups"] == ["easy", "hard"]
    assert set(summary["length_buckets"]["dense"]) == {"short", "medium", "long"}
