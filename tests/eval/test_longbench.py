"""LongBench on tiny local files in LongBench's own jsonl format (the hub is not reachable here)."""
import argparse
from pathlib import Path

import pytest

from twilight_eval.common import EvalError
from twilight_eval.tasks import longbench

DATA = Path(__file__).with_name("data") / "longbench"


def task(datasets, e=False, data_dir=DATA):
    return longbench.LongBenchTask(argparse.Namespace(datasets=datasets, longbench_e=e,
                                                      data_dir=str(data_dir) if data_dir else None,
                                                      data_url=longbench.DEFAULT_DATA_URL))


def test_prompt_template_chat_and_budget(tokenizer, encoder):
    samples = task(["hotpotqa", "trec", "lcc"]).build_samples(tokenizer, encoder, [1024], None, seed=0)
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == ["hotpotqa/hp-0/L1024", "hotpotqa/hp-1/L1024", "lcc/lcc-0/L1024", "trec/trec-0/L1024"]
    hp = tokenizer.decode(by_id["hotpotqa/hp-0/L1024"].input_ids)
    assert hp.startswith("<|im_start|>system")                       # chat template for QA
    assert "The following are given passages.\nPassage 1:\nGull Point" in hp
    assert hp.endswith("Question: Which town is the lighthouse of Gull Point closest to?\nAnswer:"
                       "<|im_end|>\n<|im_start|>assistant\n")
    trec = tokenizer.decode(by_id["trec/trec-0/L1024"].input_ids)
    assert trec.startswith("Please determine the type of the question below.")   # few-shot: no chat template
    assert by_id["trec/trec-0/L1024"].meta["all_classes"][1] == "Color"
    assert by_id["trec/trec-0/L1024"].metric == "classification"
    lcc = tokenizer.decode(by_id["lcc/lcc-0/L1024"].input_ids)
    assert lcc.startswith("Please complete the code given below.") and lcc.endswith("Next line of code:\n")
    assert {s.max_new_tokens for s in samples} == {32, 64}
    assert by_id["hotpotqa/hp-0/L1024"].metric == "qa_f1"


def test_long_prompts_are_truncated_in_the_middle(tokenizer, encoder):
    (short, long) = task(["hotpotqa"]).build_samples(tokenizer, encoder, [512], None, seed=0)
    assert long.input_tokens + long.max_new_tokens <= 512
    assert long.input_tokens + long.max_new_tokens >= 512 - 8
    text = tokenizer.decode(long.input_ids)
    assert "Answer the question based on the given passages." in text            # the head is kept
    assert "Kestrel Bay was first surveyed in 1801" in text
    assert text.rstrip().endswith("<|im_start|>assistant")                       # the tail too
    assert "Question: In which year was the harbor of Kestrel Bay first surveyed?" in text
    assert "surveyed in the year 1840" not in text                               # the middle is gone
    assert "Passage 79:" in text


def test_truncate_middle_keeps_both_halves(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(400))
    cut = longbench.truncate_middle(tokenizer, prompt, 100)
    assert cut.startswith("w0 w1") and cut.endswith("w398 w399")
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 102
    assert longbench.truncate_middle(tokenizer, "short text", 100) == "short text"


def test_postprocess_follows_longbench(tokenizer, encoder):
    t = task(["trec", "lcc", "hotpotqa"])
    samples = {s.task: s for s in t.build_samples(tokenizer, encoder, [1024], 1, 0)}
    assert t.postprocess(samples["trec"], "\nColor\nQuestion: next") == "Color"     # first line only
    assert t.extra_eos_ids(samples["trec"], tokenizer) == tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert t.postprocess(samples["lcc"], "    return 1\n") == "    return 1\n"      # code is not stripped
    assert t.postprocess(samples["hotpotqa"], " Marrow\n") == "Marrow"
    assert t.extra_eos_ids(samples["hotpotqa"], tokenizer) == []


def test_longbench_e_records_length_buckets(tokenizer, encoder):
    samples = task(["hotpotqa"], e=True).build_samples(tokenizer, encoder, [1024], None, seed=0)
    assert [s.meta["bucket"] for s in samples] == ["0-4k", "8k+"]
    assert [s.meta["words"] for s in samples] == [1200, 9100]


def test_samples_pick_a_seeded_subset(tokenizer, encoder):
    a = task(["hotpotqa"]).build_samples(tokenizer, encoder, [1024], 1, seed=5)
    b = task(["hotpotqa"]).build_samples(tokenizer, encoder, [1024], 1, seed=5)
    assert len(a) == 1 and a[0].id == b[0].id


def test_bad_inputs_are_clear_errors(tokenizer, encoder, tmp_path):
    with pytest.raises(EvalError, match=r"--data-dir: .*narrativeqa.jsonl not found"):
        task(["narrativeqa"]).build_samples(tokenizer, encoder, [1024], None, 0)
    with pytest.raises(EvalError, match=r"--datasets: musique not in LongBench-E"):
        task(["musique"], e=True).check_arguments()
    with pytest.raises(EvalError, match="is not a directory"):
        task(["trec"], data_dir=tmp_path / "missing").check_arguments()
    with pytest.raises(EvalError, match="--lengths 40 is too short"):
        task(["hotpotqa"]).build_samples(tokenizer, encoder, [40], None, 0)


def test_unreachable_hub_is_a_clear_error(tokenizer, encoder, monkeypatch):
    monkeypatch.setattr(longbench, "hub_reachable", lambda timeout=3.0: (False, "huggingface.co unreachable (test)"))
    with pytest.raises(EvalError, match=r"cannot fetch https://huggingface.co/.*data.zip: huggingface.co "
                                        r"unreachable \(test\); .* pass --data-dir"):
        task(["trec"], data_dir=None).build_samples(tokenizer, encoder, [1024], None, 0)


def test_a_zip_url_is_read_through_datasets(tokenizer, encoder, tmp_path):
    """The default path reads ``data/<name>.jsonl`` out of LongBench's zip; here a local copy of one."""
    import zipfile
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(DATA / "trec.jsonl", "data/trec.jsonl")
    t = longbench.LongBenchTask(argparse.Namespace(datasets=["trec"], longbench_e=False, data_dir=None,
                                                   data_url=str(archive)))
    (s,) = t.build_samples(tokenizer, encoder, [1024], None, 0)
    assert s.answers == ["Color"]

