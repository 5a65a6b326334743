"""RULER's haystacks without repetition (twilight_eval.haystack) and its wonderwords pools, up to 128k tokens."""
import argparse
import hashlib
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from importlib import resources

import pytest

from twilight_eval import haystack
from twilight_eval.common import EvalError, PromptEncoder, fit_largest, split_sentences
from twilight_eval.tasks import ruler

pytest.importorskip("wonderwords")

L128K = 131072


def ruler_task(*tasks, **options):
    return ruler.RulerTask(argparse.Namespace(tasks=list(tasks), **options))


def haystack_of(sample, tokenizer) -> str:
    """The sample's haystack as text: its context span, needles taken out."""
    text = tokenizer.decode(sample.input_ids[sample.meta["context_start"]:sample.meta["context_end"]])
    for needle in sample.meta.get("needles", []):
        assert text.count(needle["text"]) == 1, needle["text"]
        text = text.replace(needle["text"], " ")
    return re.sub(r"\s+", " ", text).strip()


def wonderwords_asset(name: str) -> set[str]:
    """One of wonderwords' packaged lists, read straight from its files (independently of twilight_eval)."""
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return {line.rstrip() for line in text.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def samples_128k(tokenizer):
    """niah_single_2 (essays), niah_multikey_2 (distractor needles) and cwe at 128k tokens, built once."""
    encoder = PromptEncoder(tokenizer, "auto")
    started = time.perf_counter()
    samples = ruler_task("niah_single_2", "niah_multikey_2", "cwe").build_samples(tokenizer, encoder, [L128K], 1,
                                                                                 seed=0)
    seconds = time.perf_counter() - started
    return {s.task: s for s in samples}, seconds


# --------------------------------------------------------------------------- 128k tokens, no repetition

@pytest.mark.slow   # the three 128k samples take ~10 s together (built once)
def test_128k_essay_haystack_repeats_no_sentence_and_no_passage(samples_128k, tokenizer):
    samples, seconds = samples_128k
    s = samples["niah_single_2"]
    assert L128K - 64 <= s.input_tokens + s.max_new_tokens <= L128K
    assert s.meta["haystack_source"] == haystack.DEFAULT_SOURCE
    text = haystack_of(s, tokenizer)
    words = text.split(" ")
    essays = re.sub(r"\s+", " ", haystack.essay_text()).strip()
    assert text.startswith(essays[:2000])                   # the shipped essays first...
    assert len(words) > 15 * len(essays.split(" "))         # ...then far more than they hold
    sentences = Counter(sentence for sentence in split_sentences(text) if len(sentence.split()) >= 5)
    assert len(sentences) > 5000
    repeated = [sentence for sentence, count in sentences.items() if count > 1]
    assert not repeated, repeated[:3]
    windows = Counter(tuple(words[i:i + 30]) for i in range(len(words) - 29))
    assert max(windows.values()) == 1
    assert seconds < 60, f"three 128k samples took {seconds:.1f} s"


@pytest.mark.slow
def test_128k_needle_haystack_repeats_no_distractor(samples_128k, tokenizer):
    s = samples_128k[0]["niah_multikey_2"]
    assert s.meta["haystack_source"] == "needles"
    lines = tokenizer.decode(s.input_ids[s.meta["context_start"]:s.meta["context_end"]]).strip().split("\n")
    assert len(lines) == s.meta["haystack_units"] + 1 > 5000
    keys = [re.fullmatch(r"One of the special magic numbers for (.+) is: (\d+)\.", line).groups() for line in lines]
    assert len({k for k, _ in keys}) == len({v for _, v in keys}) == len(lines)


@pytest.mark.slow
def test_128k_cwe_repeats_words_only_by_design(samples_128k, tokenizer):
    s = samples_128k[0]["cwe"]
    text = tokenizer.decode(s.input_ids)
    main = text[text.rindex("Below is a numbered list"):].split("Question:")[0]
    items = re.findall(r"\d+\. (.+?)(?= \d+\. |\n|$)", main.split("\n", 1)[1])
    counts = Counter(items)
    assert len(counts) == s.meta["haystack_units"] > 4000
    assert sorted(w for w, c in counts.items() if c == 30) == sorted(s.answers)   # RULER's freq_cw
    assert {c for w, c in counts.items() if w not in s.answers} == {3}              # freq_ucw: every other word
    assert set(counts) <= set(haystack.word_pool())      # all real pool words: SmolLM2 stays below the pool's end


# --------------------------------------------------------------------------- the generated corpus

def test_corpus_is_the_essays_then_generated_prose_that_never_repeats_a_sentence():
    corpus = haystack.EssayCorpus()
    words = corpus.words(150_000)
    assert len(words) == 150_000
    essays = re.sub(r"\s+", " ", haystack.essay_text()).strip().split(" ")
    assert words[:len(essays)] == essays and corpus.essay_words == len(essays)
    long_sentences = [s for s in split_sentences(" ".join(words)) if len(s.split()) >= 5]
    assert len(long_sentences) == len(set(long_sentences))
    generated = split_sentences(" ".join(corpus.paragraphs))   # every one, short ones too, is new
    assert len(generated) > 8000
    assert len(set(generated)) == len(generated) and not set(generated) & set(split_sentences(" ".join(essays)))
    assert all(re.fullmatch(r"[A-Z][^.?!]*[a-z'][.?]", s) for s in generated), [
        s for s in generated if not re.fullmatch(r"[A-Z][^.?!]*[a-z'][.?]", s)][:3]
    assert 8 <= len(" ".join(corpus.paragraphs).split()) / len(generated) <= 20   # essay-like sentence lengths


def test_corpus_is_fast():
    haystack.word_lists()   # wonderwords' lists are loaded once per process
    started = time.perf_counter()
    haystack.EssayCorpus().words(100_000)
    assert time.perf_counter() - started < 2.0


def test_corpus_is_the_same_text_in_every_process_and_for_every_length():
    text = haystack.EssayCorpus().text(30_000)
    assert haystack.EssayCorpus().text(1_000) == " ".join(text.split(" ")[:1_000])
    code = ("import hashlib; from twilight_eval.haystack import EssayCorpus; "
            "print(hashlib.sha1(EssayCorpus().text(30_000).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha1(text.encode()).hexdigest()
    assert haystack.EssayCorpus(seed="another").text(30_000) != text     # the seed is what fixes it


def test_grammar_helpers():
    assert [haystack.third_person(v) for v in ("mend", "polish", "carry", "pay", "box", "veto")] == \
        ["mends", "polishes", "carries", "pays", "boxes", "vetoes"]
    assert [haystack.gerund(v) for v in ("mend", "bake", "tie", "stop", "see", "visit", "begin", "sew")] == \
        ["mending", "baking", "tying", "stopping", "seeing", "visiting", "beginning", "sewing"]
    nouns = ("tomb", "church", "berry", "day", "child", "leaf", "fireman", "contact lens")
    assert [haystack.plural(n) for n in nouns] == ["tombs", "churches", "berries", "days", "children", None, None, None]
    assert [haystack.with_article(w) for w in ("tomb", "icy tomb", "university", "hour", "owl")] == \
        ["a tomb", "an icy tomb", "a university", "an hour", "an owl"]


# --------------------------------------------------------------------------- wonderwords' pools

def test_pools_are_wonderwords_lists_as_ruler_builds_them():
    nouns, adjectives, verbs = (wonderwords_asset(f"{k}list.txt") for k in ("noun", "adjective", "verb"))
    lists = haystack.word_lists()
    assert set(lists["nouns"]) == nouns and set(lists["adjectives"]) == adjectives and set(lists["verbs"]) == verbs
    assert list(haystack.word_pool()) == sorted(nouns | adjectives | verbs)
    assert len(haystack.word_pool()) > 8000


def test_needle_keys_are_wonderwords_adjective_noun_pairs_drawn_with_our_rng():
    nouns, adjectives = wonderwords_asset("nounlist.txt"), wonderwords_asset("adjectivelist.txt")
    keys = [haystack.needle_key(random.Random(i)) for i in range(200)]
    for key in keys:
        assert any(key[:i] in adjectives and key[i + 1:] in nouns for i, c in enumerate(key) if c == "-"), key
    random.seed(0)   # wonderwords' (and Python's) global random state plays no part
    again = [haystack.needle_key(random.Random(i)) for i in range(200)]
    assert keys == again and len(set(keys)) > 190


def test_ruler_keys_and_cwe_words_come_from_wonderwords(tokenizer, encoder):
    nouns, adjectives = wonderwords_asset("nounlist.txt"), wonderwords_asset("adjectivelist.txt")
    s = ruler_task("niah_multikey_1").build_samples(tokenizer, encoder, [1024], 1, seed=5)[0]
    for needle in s.meta["needles"]:
        key = re.search(r"for (.+) is:", needle["text"]).group(1)
        assert any(key[:i] in adjectives and key[i + 1:] in nouns for i, c in enumerate(key) if c == "-"), key
    cwe = ruler_task("cwe").build_samples(tokenizer, encoder, [1024], 1, seed=5)[0]
    assert set(cwe.answers) <= set(haystack.word_pool())


def test_cwe_words_past_the_pool_are_unique_pairs_never_built_from_the_answers():
    pool = list(haystack.word_pool())
    random.Random(0).shuffle(pool)
    words = ruler._cwe_words(pool, len(pool) + 20_000, num_cw=10)
    assert words[:len(pool)] == pool and len(words) == len(set(words)) == len(pool) + 20_000
    answers = set(pool[:10])
    made_up = words[len(pool):]
    assert all("-" in w for w in made_up)
    assert not any(w.startswith(a + "-") or w.endswith("-" + a) for w in made_up for a in answers)
    assert ruler._cwe_words(pool, 100, num_cw=10) == pool[:100]


def test_missing_wonderwords_is_a_clear_error_before_any_model(monkeypatch):
    monkeypatch.setattr(ruler, "wonderwords_available", lambda: False)
    with pytest.raises(EvalError, match=r"niah_single_2, cwe need the wonderwords package.*pip install"):
        ruler_task("niah_single_2", "vt", "cwe").check_arguments()
    ruler_task("vt", "fwe", "niah_multikey_3").check_arguments()   # no words drawn: no wonderwords needed
    monkeypatch.setitem(sys.modules, "wonderwords", None)           # `import wonderwords` fails
    assert not haystack.wonderwords_available()
    with pytest.raises(EvalError, match=r"wonderwords.*not installed.*pip install"):
        haystack.require_wonderwords()


# --------------------------------------------------------------------------- --haystack-file

def _numbered_text(sentences: int) -> str:
    return "\n\n".join(f"Line {i} of the test book tells of the {i}th lantern on the quay." for i in range(sentences))


def test_haystack_file_replaces_the_essays(tokenizer, encoder, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(_numbered_text(400), encoding="utf-8")
    task = ruler_task("niah_single_2", "niah_single_1", haystack_file=str(book), lengths=[1024])
    task.check_arguments()
    essay, noise = task.build_samples(tokenizer, encoder, [1024], 1, seed=0)
    assert essay.meta["haystack_source"] == "file:book.txt"
    assert essay.meta["haystack_sha1"] == hashlib.sha1(book.read_bytes()).hexdigest()
    assert noise.meta["haystack_source"] == "noise"
    text = haystack_of(essay, tokenizer)
    assert text.startswith("Line 0 of the test book") and "Line 20 of the test book" in text
    assert re.sub(r"\s+", " ", book.read_text()).startswith(text.rsplit(" ", 1)[0])
    default = ruler_task("niah_single_2").build_samples(tokenizer, encoder, [1024], 1, seed=0)[0]
    assert default.meta["haystack_source"] == "essays+generated"
    assert default.fingerprint != essay.fingerprint and default.answers == essay.answers   # same needle, other text


def test_haystack_file_too_short_is_an_error(tokenizer, encoder, tmp_path, monkeypatch):
    book = tmp_path / "short.txt"
    book.write_text(_numbered_text(40), encoding="utf-8")   # ~600 tokens
    # before the model loads, when the bytes cannot make the longest length's haystack
    with pytest.raises(EvalError, match=r"--haystack-file: .*short.txt is too short for --lengths 131072"):
        ruler_task("niah_single_2", haystack_file=str(book), lengths=[L128K]).check_arguments()
    # exactly, before any sample is built
    task = ruler_task("niah_single_2", haystack_file=str(book), lengths=[2048])
    task.check_arguments()
    with pytest.raises(EvalError, match=r"short.txt is too short for ruler niah_single_2 at --lengths 2048: all of "
                                        r"its \d+ words"):
        task.build_samples(tokenizer, encoder, [512, 2048], 1, seed=0)
    # and while fitting, should the estimate let it through
    monkeypatch.setattr(ruler.RulerTask, "_check_haystack_length", lambda self, encoder, lengths: None)
    with pytest.raises(EvalError, match=r"too short for ruler niah_single_2 at --lengths 2048"):
        task.build_samples(tokenizer, encoder, [2048], 1, seed=0)
    assert len(task.build_samples(tokenizer, encoder, [512], 1, seed=0)[0].input_ids) <= 512


def test_haystack_file_errors(tmp_path):
    with pytest.raises(EvalError, match=r"--haystack-file: cannot read .*missing.txt"):
        ruler_task("niah_single_2", haystack_file=str(tmp_path / "missing.txt")).check_arguments()
    with pytest.raises(EvalError, match="is not a file"):
        ruler_task("niah_single_2", haystack_file=str(tmp_path)).check_arguments()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 5000)
    with pytest.raises(EvalError, match="is not UTF-8 text"):
        ruler_task("niah_single_2", haystack_file=str(tmp_path / "latin1.txt")).check_arguments()
    (tmp_path / "empty.txt").write_text(" \n\n ")
    with pytest.raises(EvalError, match="holds no text"):
        ruler_task("niah_single_2", haystack_file=str(tmp_path / "empty.txt")).check_arguments()
    (tmp_path / "book.txt").write_text(_numbered_text(2000))
    task = ruler_task("vt", haystack_file=str(tmp_path / "book.txt"))
    task.check_arguments()
    assert any("--haystack-file" in note and "not used" in note for note in task.notes)


def test_haystack_file_reads_only_its_start(tmp_path, monkeypatch):
    monkeypatch.setattr(haystack, "FILE_MAX_BYTES", 1000)
    # 2-byte characters and a no-break space (whitespace, like RULER's \s+)
    (tmp_path / "big.txt").write_text("café\u00a0au lait, déjà vu.\n" * 200, encoding="utf-8")
    corpus = haystack.file_corpus(str(tmp_path / "big.txt"))
    assert corpus.bytes <= 1000 and corpus.size == len(corpus.text(corpus.size).split(" "))
    assert corpus.text(5) == "café au lait, déjà vu." and corpus.text(corpus.size).endswith((",", ".", "vu"))
    with pytest.raises(EvalError, match="words, .* were asked for"):
        corpus.words(corpus.size + 1)


def test_haystack_file_option_parses():
    parser = argparse.ArgumentParser()
    ruler.RulerTask.add_arguments(parser)
    assert parser.parse_args(["--haystack-file", "pg19.txt"]).haystack_file == "pg19.txt"
    assert parser.parse_args([]).haystack_file is None


# --------------------------------------------------------------------------- determinism and fitting

def test_ruler_essay_samples_are_deterministic(tokenizer, encoder):
    a = ruler_task("niah_single_2", "niah_multiquery").build_samples(tokenizer, encoder, [4096], 2, seed=7)
    b = ruler_task("niah_single_2", "niah_multiquery").build_samples(tokenizer, encoder, [4096], 2, seed=7)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.fingerprint for s in a] == [s.fingerprint for s in b]
    assert a[0].input_ids != a[1].input_ids


@pytest.mark.parametrize("step", [1, 3, 7])
def test_fit_finds_fit_largest_answer_in_few_probes(step):
    def prompt_len(n):   # non-decreasing, nearly linear, with jumps
        calls.append(n)
        return 40 + step * n + (n // 13) * 2 + 5 * (n // 97)

    for budget in (41, 400, 5_000, 130_000):
        for hi in (None, 2_000, 100_000):
            calls = []
            expected = fit_largest(prompt_len, budget, 0, "x", hi=hi)
            calls = []
            assert ruler._fit(prompt_len, budget, 0, "x", hi=hi) == expected, (budget, hi)
            assert len(set(calls)) <= 14, (budget, hi, len(set(calls)))
    with pytest.raises(EvalError, match="x is too short"):
        ruler._fit(prompt_len, 10, 0, "x")
