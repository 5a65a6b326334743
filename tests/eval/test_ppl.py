"""Perplexity through forced decode steps equals teacher forcing on an unpatched model."""
import argparse
import math

import pytest
import torch

from twilight_eval.common import EvalError
from twilight_eval.ppl import PerplexityTask, forced_decode_nll


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_forced_decode_scores_the_same_tokens_as_teacher_forcing(tiny_model):
    ids = torch.randint(10, 5000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    prefill = 30
    nll = forced_decode_nll(tiny_model, ids, prefill)
    assert len(nll) == len(ids) - prefill - 1             # token `prefill` comes from the prefill: not scored
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([ids])).logits[0].float()   # [T, V]
    logprobs = torch.log_softmax(logits, -1)
    expected = [-float(logprobs[t - 1, ids[t]]) for t in range(prefill + 1, len(ids))]
    assert nll == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_windows_and_aggregation(tokenizer, encoder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i}" for i in range(600)))
    task = PerplexityTask(argparse.Namespace(text=str(text), decode_tokens=16))
    task.check_arguments()
    samples = task.build_samples(tokenizer, encoder, [128, 256], 2, seed=0)
    assert [s.id for s in samples] == ["ppl/L128/s0", "ppl/L128/s1", "ppl/L256/s0", "ppl/L256/s1"]
    for s in samples:
        assert len(s.input_ids) == s.length and s.meta["prefill_tokens"] == s.length - 17
    assert samples[0].meta["offset"] == 0 and samples[1].meta["offset"] != 0
    # perplexity over all scored tokens, not the mean of per-sample perplexities:
    # exp((2 + 4) / (2 + 2)) = exp(1.5)
    records = [{"nll_sum": 2.0, "scored_tokens": 2}, {"nll_sum": 4.0, "scored_tokens": 2}]
    assert task.aggregate(records) == pytest.approx(math.exp(1.5))


def test_text_too_short_and_missing_file(tokenizer, encoder, tmp_path):
    task = PerplexityTask(argparse.Namespace(text=None, decode_tokens=16))
    with pytest.raises(EvalError, match=r"ppl: --lengths 100000 needs 100000 tokens of text but the default "
                                        r"text has \d+; pass a longer --text FILE\|DIR or smaller --lengths"):
        task.build_samples(tokenizer, encoder, [100000], 1, seed=0)
    with pytest.raises(EvalError, match=r"--decode-tokens 16 must be smaller"):
        task.build_samples(tokenizer, encoder, [16], 1, seed=0)
    with pytest.raises(EvalError, match="--text: cannot read"):
        PerplexityTask(argparse.Namespace(text=str(tmp_path / "none.txt"), decode_tokens=4)).check_arguments()


def test_the_text_is_tokenized_once(tokenizer, encoder):
    calls = []

    def counting(text, **kwargs):
        calls.append(len(text))
        return tokenizer(text, **kwargs)

    task = PerplexityTask(argparse.Namespace(text=None, decode_tokens=16))
    samples = task.build_samples(counting, encoder, [128, 256], 2, seed=0)
    assert task.build_samples(counting, encoder, [512], 1, seed=0)[0].meta["book"] == "essays.txt"
    assert len(calls) == 1 and [s.meta["book"] for s in samples] == ["essays.txt"] * 4


def write_books(directory):
    """Three books of distinct words (two long, one short) and a file that is not a book."""
    directory.mkdir()
    books = {"a.txt": " ".join(f"alpha{i}" for i in range(200)), "b.txt": " ".join(f"bravo{i}" for i in range(700)),
             "c.txt": "charlie " * 20}
    for name, text in books.items():
        (directory / name).write_text(text)
    (directory / "README.md").write_text("not a book " * 500)
    return books


def test_windows_of_a_directory_of_books_stay_inside_one_book(tokenizer, encoder, tmp_path):
    books = write_books(tmp_path / "pg19")
    tokens = {name: tokenizer(text)["input_ids"] for name, text in books.items()}
    task = PerplexityTask(argparse.Namespace(text=str(tmp_path / "pg19"), decode_tokens=16))
    task.check_arguments()
    samples = task.build_samples(tokenizer, encoder, [128, 1024], 4, seed=0)
    assert [s.id for s in samples] == [f"ppl/L{L}/s{i}" for L in (128, 1024) for i in range(4)]
    for s in samples:
        book = tokens[s.meta["book"]]
        assert s.input_ids == book[s.meta["offset"]:s.meta["offset"] + s.length]     # one book, never two
        assert len(s.input_ids) == s.length and s.meta["prefill_tokens"] == s.length - 17
    assert {s.meta["book"] for s in samples if s.length == 128} == {"a.txt", "b.txt"}   # c.txt is too short
    assert samples[0].meta["book"] != samples[1].meta["book"]                          # distinct books first
    assert {s.meta["book"] for s in samples if s.length == 1024} == {"b.txt"}           # a.txt is too short too
    assert len({s.meta["offset"] for s in samples if s.length == 1024}) > 1
    assert task.notes == [f"ppl: --lengths 128: 1 of 3 books in {tmp_path / 'pg19'} are shorter and skipped",
                          f"ppl: --lengths 1024: 2 of 3 books in {tmp_path / 'pg19'} are shorter and skipped"]


def test_book_windows_are_deterministic_in_the_seed(tokenizer, encoder, tmp_path):
    write_books(tmp_path / "pg19")

    def windows(seed):
        task = PerplexityTask(argparse.Namespace(text=str(tmp_path / "pg19"), decode_tokens=16))
        return [(s.meta["book"], s.meta["offset"], s.fingerprint)
                for s in task.build_samples(tokenizer, encoder, [128], 4, seed=seed)]

    assert windows(0) == windows(0)
    assert windows(0) != windows(1)


def test_directory_errors(tokenizer, encoder, tmp_path):
    write_books(tmp_path / "pg19")
    task = PerplexityTask(argparse.Namespace(text=str(tmp_path / "pg19"), decode_tokens=16))
    longest = len(tokenizer(" ".join(f"bravo{i}" for i in range(700)))["input_ids"])
    with pytest.raises(EvalError, match=rf"ppl: --lengths 5000 needs 5000 tokens of text but the longest book in "
                                        rf".*pg19, b.txt, has {longest}; pass a longer --text FILE\|DIR"):
        task.build_samples(tokenizer, encoder, [5000], 1, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no books here")
    with pytest.raises(EvalError, match=r"--text: no .txt files in the directory .*empty"):
        PerplexityTask(argparse.Namespace(text=str(tmp_path / "empty"), decode_tokens=16)).check_arguments()
    (tmp_path / "pg19" / "d.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(EvalError, match=r"--text: .*d.txt is not UTF-8 text"):
        PerplexityTask(argparse.Namespace(text=str(tmp_path / "pg19"), decode_tokens=16)).build_samples(
            tokenizer, encoder, [128], 1, seed=0)


def test_the_shipped_text_is_long_enough_for_the_default_lengths(tokenizer):
    from twilight_eval.common import essay_text
    assert len(tokenizer(essay_text())["input_ids"]) > max(PerplexityTask.default_lengths)
