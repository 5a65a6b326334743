"""Sample generation: lengths in the model's tokens, needles really at their depth, answers right."""
import argparse
import re
from collections import Counter

import pytest

from twilight.models import PASSKEY_FILLER, PASSKEY_NEEDLE
from twilight_eval.common import EvalError
from twilight_eval.tasks import passkey, ruler

RULER_SYNTHETIC = [t for t in ruler.RULER_TASKS if not t.startswith("qa")]


def passkey_task(depths=(0, 50, 100)):
    return passkey.PasskeyTask(argparse.Namespace(depths=list(depths)))


def ruler_task(*tasks):
    return ruler.RulerTask(argparse.Namespace(tasks=list(tasks)))


def assert_fits(sample, length, slack):
    """The prompt plus the generation budget fills the length, without exceeding it."""
    total = sample.input_tokens + sample.max_new_tokens
    assert total <= length, f"{sample.id}: {total} tokens > {length}"
    assert total >= length - slack, f"{sample.id}: only {total} of {length} tokens used"


# --------------------------------------------------------------------------- passkey

def test_passkey_needle_is_in_the_haystack_at_the_stated_depth_and_length(tokenizer, encoder):
    samples = passkey_task().build_samples(tokenizer, encoder, [512, 1024], 2, seed=0)
    assert len(samples) == 2 * 3 * 2   # lengths x depths x samples
    filler_tokens = encoder.token_count(PASSKEY_FILLER + "\n")
    for s in samples:
        assert_fits(s, s.length, slack=filler_tokens + 2)
        key = s.meta["key"]
        assert s.answers == [key] and re.fullmatch(r"\d{5}", key)
        text = tokenizer.decode(s.input_ids)
        needle = PASSKEY_NEEDLE.format(key=key)
        assert text.count(needle) == 1
        # Depth, recomputed from the decoded prompt: filler lines before the needle over all filler lines.
        before = text[:text.index(needle)].count(PASSKEY_FILLER)
        total = text.count(PASSKEY_FILLER)
        assert total == s.meta["filler_lines"]
        assert abs(before / total - s.meta["depth"] / 100) <= 1 / total
        # The recorded token offset points at the needle and agrees with the depth in tokens.
        assert tokenizer.decode(s.input_ids[s.meta["needle_token"]:s.meta["needle_token"] + 6]).strip() \
            .startswith("The pass key")
        assert abs(s.meta["token_depth"] - s.meta["depth"] / 100) <= 1.5 * filler_tokens / s.meta["context_tokens"]
        assert text.rstrip().endswith("The pass key is")


def test_passkey_is_deterministic_in_the_seed(tokenizer, encoder):
    task = passkey_task(depths=[50])
    a = task.build_samples(tokenizer, encoder, [512], 2, seed=1)
    b = task.build_samples(tokenizer, encoder, [512], 2, seed=1)
    c = task.build_samples(tokenizer, encoder, [512], 2, seed=2)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.fingerprint for s in a] == [s.fingerprint for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].answers != a[1].answers      # samples of one cell differ


def test_passkey_too_short_length_is_a_clear_error(tokenizer, encoder):
    with pytest.raises(EvalError, match=r"passkey: --lengths 64 is too short"):
        passkey_task().build_samples(tokenizer, encoder, [64], 1, seed=0)


# --------------------------------------------------------------------------- RULER

@pytest.fixture(scope="module")
def ruler_1024(tokenizer):
    from twilight_eval.common import PromptEncoder
    encoder = PromptEncoder(tokenizer, "auto")
    samples = ruler_task(*RULER_SYNTHETIC).build_samples(tokenizer, encoder, [1024], 1, seed=0)
    return {s.task: s for s in samples}


def test_ruler_generates_every_synthetic_task_within_the_length(ruler_1024):
    assert sorted(ruler_1024) == sorted(RULER_SYNTHETIC)
    for s in ruler_1024.values():
        assert_fits(s, 1024, slack=80)   # one haystack unit (a needle-sized line at most) of slack
        assert s.metric == "string_match_all"
        assert s.max_new_tokens == ruler.TEMPLATES[ruler.RULER_TASKS[s.task].kind][2]


@pytest.mark.parametrize("task", [t for t in RULER_SYNTHETIC if t.startswith("niah") or t == "vt"])
def test_ruler_needles_are_at_their_depth(ruler_1024, tokenizer, task):
    s = ruler_1024[task]
    text = tokenizer.decode(s.input_ids)
    start, end = s.meta["context_start"], s.meta["context_end"]
    # the recorded haystack span starts right after the instructions and ends before the question
    assert re.search(r"(afterwards\.|following text\.)\s*$", tokenizer.decode(s.input_ids[:start]))
    assert re.match(r"\s*(What|Question)", tokenizer.decode(s.input_ids[end:]))
    needle_tokens = 0
    for needle in sorted(s.meta["needles"], key=lambda n: n["token"]):
        assert text.count(needle["text"]) == 1, needle["text"]
        # the recorded token offset points at the needle...
        size = len(tokenizer(needle["text"], add_special_tokens=False)["input_ids"])
        assert tokenizer.decode(s.input_ids[needle["token"]:needle["token"] + size]).strip() == needle["text"]
        # ...which sits at the requested depth of the haystack (needles excluded), within one haystack unit
        depth = (needle["token"] - start - needle_tokens) / (end - start - sum(
            len(tokenizer(n["text"], add_special_tokens=False)["input_ids"]) for n in s.meta["needles"]))
        unit = 1.5 / s.meta["haystack_units"] if ruler.RULER_TASKS[task].haystack != "essay" else 0.0
        assert abs(depth - needle["depth"] / 100) <= max(0.05, unit), (needle, depth)
        needle_tokens += size
    for answer in s.answers:
        assert answer in text


def test_ruler_niah_variants_ask_the_right_things(ruler_1024):
    single = ruler_1024["niah_single_1"]
    assert len(single.answers) == 1 and re.fullmatch(r"\d{7}", single.answers[0])
    uuid_sample = ruler_1024["niah_single_3"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid_sample.answers[0])
    multikey = ruler_1024["niah_multikey_1"]
    assert len(multikey.meta["needles"]) == 4 and len(multikey.answers) == 1
    multivalue = ruler_1024["niah_multivalue"]
    keys = {re.search(r"for (.+?) is:", n["text"]).group(1) for n in multivalue.meta["needles"]}   # may hold a space
    assert len(keys) == 1 and len(multivalue.answers) == 4
    multiquery = ruler_1024["niah_multiquery"]
    assert len(multiquery.answers) == 4 and len(multiquery.meta["needles"]) == 4
    distractors = ruler_1024["niah_multikey_2"]
    assert distractors.meta["haystack_units"] > 5   # a haystack of other needles


def test_ruler_single_value_wording(ruler_1024, tokenizer):
    text = tokenizer.decode(ruler_1024["niah_single_2"].input_ids)
    assert "A special magic number is hidden within the following text." in text
    assert "What is the special magic number for" in text
    text = tokenizer.decode(ruler_1024["niah_multivalue"].input_ids)
    assert "Some special magic numbers are hidden within the following text." in text


def test_ruler_variable_tracking_answer_is_the_chain(ruler_1024, tokenizer):
    s = ruler_1024["vt"]
    text = tokenizer.decode(s.input_ids)
    main = text[text.rindex("Memorize and track"):]          # skip the solved example
    query = re.search(r"assigned the value (\d+) in the text above", main).group(1)
    values = {}
    for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", main):
        values[name] = rhs
    def resolve(name):
        rhs = values[name]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs
    assert sorted(n for n in values if resolve(n) == query) == sorted(s.answers)
    assert len(s.answers) == 5


def test_ruler_common_words_answer_is_the_ten_most_common(ruler_1024, tokenizer):
    s = ruler_1024["cwe"]
    text = tokenizer.decode(s.input_ids)
    main = text[text.rindex("Below is a numbered list"):]
    # wonderwords' pool has a few two-word entries ("dump truck"): an item runs to the next number
    counts = Counter(re.findall(r"\d+\. (.+?)(?= \d+\. |\n|$)", main.split("Question:")[0]))
    top = [w for w, _ in counts.most_common()]
    assert sorted(top[:10]) == sorted(s.answers)
    assert counts[top[9]] > counts[top[10]]


def test_ruler_frequent_words_answer_is_the_top_three(ruler_1024, tokenizer):
    s = ruler_1024["fwe"]
    text = tokenizer.decode(s.input_ids)
    coded = text.split("coded words.")[1].split("Question:")[0]
    counts = Counter(w for w in coded.split() if w != "...")
    assert [w for w, _ in counts.most_common(3)] == s.answers
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1]


def test_ruler_is_deterministic_in_the_seed(tokenizer, encoder):
    task = ruler_task("niah_single_2", "fwe")
    a = task.build_samples(tokenizer, encoder, [512], 2, seed=3)
    b = task.build_samples(tokenizer, encoder, [512], 2, seed=3)
    c = task.build_samples(tokenizer, encoder, [512], 2, seed=4)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.input_ids for s in a] != [s.input_ids for s in c]
    assert [s.id for s in a] == ["niah_single_2/L512/s0", "niah_single_2/L512/s1", "fwe/L512/s0", "fwe/L512/s1"]


def test_ruler_qa_is_skipped_with_a_message_when_the_hub_is_unreachable(tokenizer, encoder, monkeypatch):
    monkeypatch.setattr(ruler, "hub_reachable", lambda timeout=3.0: (False, "huggingface.co unreachable (test)"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    task = ruler_task("niah_single_1", "qa_1", "qa_2")
    samples = task.build_samples(tokenizer, encoder, [512], 1, seed=0)
    assert [s.task for s in samples] == ["niah_single_1"]
    assert any("skipped qa_1" in n and "SQuAD" in n and "unreachable" in n for n in task.notes)
    assert any("skipped qa_2" in n and "HotpotQA" in n for n in task.notes)
    with pytest.raises(EvalError, match="every selected task was skipped"):
        ruler_task("qa_1").build_samples(tokenizer, encoder, [512], 1, seed=0)


def test_ruler_qa_offline_mode_tries_the_cache_then_skips(tokenizer, encoder, monkeypatch):
    def not_cached():
        raise ConnectionError("Couldn't reach 'rajpurkar/squad_v2' on the Hub (offline mode is enabled)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(ruler.QA_LOADERS, "squad", ("SQuAD v2", not_cached))
    task = ruler_task("qa_1", "niah_single_1")
    assert [s.task for s in task.build_samples(tokenizer, encoder, [512], 1, seed=0)] == ["niah_single_1"]
    assert task.notes == ["ruler: skipped qa_1: SQuAD v2 could not be loaded through `datasets`: "
                          "Couldn't reach 'rajpurkar/squad_v2' on the Hub (offline mode is enabled)"]


def test_ruler_qa_builds_documents_around_the_gold_paragraph(tokenizer, encoder, monkeypatch):
    docs = [f"Paragraph {i} tells of the village of Stow{i}, where {i} bakers lived." for i in range(60)]
    qas = [{"query": "How many bakers lived in Stow7?", "outputs": ["7 bakers"], "context": [7], "more_context": [8]}]
    monkeypatch.setattr(ruler, "hub_reachable", lambda timeout=3.0: (True, ""))
    monkeypatch.setitem(ruler.QA_LOADERS, "squad", ("fake SQuAD", lambda: (qas, docs)))
    (s,) = ruler_task("qa_1").build_samples(tokenizer, encoder, [512], 1, seed=0)
    text = tokenizer.decode(s.input_ids)
    assert docs[7] in text and "Question: How many bakers lived in Stow7?" in text
    assert s.answers == ["7 bakers"] and s.metric == "string_match_part"
    assert_fits(s, 512, slack=40)
    assert "Document 1:\n" in text


def test_ruler_too_short_length_names_the_task(tokenizer, encoder):
    with pytest.raises(EvalError, match=r"ruler niah_single_2: --lengths 100 is too short"):
        ruler_task("niah_single_2").build_samples(tokenizer, encoder, [100], 1, seed=0)


def _write_qa_files(directory):
    """Tiny SQuAD v2 and HotpotQA dev files in their official layouts (as RULER's squad.json/hotpotqa.json)."""
    import json
    squad = {"version": "v2.0", "data": [
        {"title": "Rivers", "paragraphs": [
            {"context": "The Zambezi flows into the Indian Ocean.", "qas": [
                {"question": "Where does the Zambezi flow?", "id": "a", "is_impossible": False,
                 "answers": [{"text": "the Indian Ocean", "answer_start": 20}, {"text": "Indian Ocean",
                                                                                 "answer_start": 24}]},
                {"question": "Who drained it?", "id": "b", "is_impossible": True, "answers": []}]},
            {"context": "The Nile is long.", "qas": []}]},
        {"title": "Mountains", "paragraphs": [{"context": "Kilimanjaro is tall.", "qas": []}]}]}
    hotpot = [{"_id": "h1", "question": "Which river is longer, the Nile or the Zambezi?", "answer": "the Nile",
               "type": "comparison", "level": "easy", "supporting_facts": [["Nile", 0]],
               "context": [["Nile", ["The Nile is ", "6,650 km long."]], ["Zambezi", ["The Zambezi is 2,574 km."]]]}]
    (directory / "squad.json").write_text(json.dumps(squad))
    (directory / "hotpotqa.json").write_text(json.dumps(hotpot))


def test_ruler_qa_reads_local_squad_and_hotpotqa_files(tokenizer, encoder, tmp_path, monkeypatch):
    _write_qa_files(tmp_path)
    monkeypatch.setattr(ruler, "hub_reachable", lambda: pytest.fail("--qa-dir must not touch the hub"))
    task = ruler.RulerTask(argparse.Namespace(tasks=["qa_1", "qa_2"], qa_dir=str(tmp_path)))
    task.check_arguments()
    s1, s2 = task.build_samples(tokenizer, encoder, [512], 1, seed=0)
    assert s1.answers == ["the Indian Ocean", "Indian Ocean"] and s1.metric == "string_match_part"
    text1 = tokenizer.decode(s1.input_ids)
    assert "Where does the Zambezi flow?" in text1 and "The Zambezi flows into the Indian Ocean." in text1
    assert "The Nile is long." in text1  # the same article's paragraph comes first among the distractors
    assert s2.answers == ["the Nile"]
    text2 = tokenizer.decode(s2.input_ids)
    assert "Nile\nThe Nile is 6,650 km long." in text2 and "Which river is longer" in text2
    assert not task.notes


def test_ruler_qa_dir_errors_name_the_file(tmp_path):
    with pytest.raises(EvalError, match="--qa-dir: .* is not a directory"):
        ruler.RulerTask(argparse.Namespace(tasks=["qa_1"], qa_dir=str(tmp_path / "nope"))).check_arguments()
    with pytest.raises(EvalError, match="squad.json, which does not exist"):
        ruler.RulerTask(argparse.Namespace(tasks=["qa_1"], qa_dir=str(tmp_path))).check_arguments()
    ruler.RulerTask(argparse.Namespace(tasks=["niah_single_1"], qa_dir=str(tmp_path))).check_arguments()
    (tmp_path / "squad.json").write_text("{not json")
    with pytest.raises(EvalError, match="cannot read .*squad.json"):
        ruler.RulerTask(argparse.Namespace(tasks=["qa_1"], qa_dir=str(tmp_path)))._qa_data("squad")
