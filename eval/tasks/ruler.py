"""RULER's synthetic tasks, generated locally in the evaluated model's own tokens.

Follows the task definitions, templates, generation budgets and metrics of RULER
(Hsieh et al., 2024, github.com/NVIDIA/RULER, Apache-2.0; the prompt templates below are
RULER's): 13 tasks in four categories.

================  ===========================================================  ==========
task              what is hidden / asked                                       metric
================  ===========================================================  ==========
niah_single_1     one number for one word key, in repeated noise sentences     match all
niah_single_2     one number for one word key, in essays                       match all
niah_single_3     one UUID for one word key, in essays                         match all
niah_multikey_1   4 keys in essays, one asked                                  match all
niah_multikey_2   the needle among a haystack of needle-like distractors       match all
niah_multikey_3   as above with UUID keys and values                           match all
niah_multivalue   4 values for the same key                                    match all
niah_multiquery   4 keys, all asked                                            match all
vt                a chain of 4 variable assignments (VAR X = VAR Y) in noise    match all
cwe               the 10 most common words of a numbered word list             match all
fwe               the 3 most frequent words of a Zipf-distributed coded text   match all
qa_1              SQuAD question among distractor paragraphs                   match part
qa_2              HotpotQA question among distractor paragraphs                match part
================  ===========================================================  ==========

Differences from RULER, all deliberate:

- The essay haystack (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery) is the package's
  own original essays (not Paul Graham's), continued -- once their ~5,150 words are used up -- by prose
  generated from a fixed seed (:mod:`twilight_eval.haystack`): no sentence of it occurs twice, so a haystack
  of any length (128k tokens: about 5,150 essay words, then ~95k generated ones) never repeats a sentence or
  a paragraph (the essays alone would repeat ~20 times at 128k). ``--haystack-file`` takes any UTF-8 text
  instead (PG-19 books, say), never repeated: a file too short for a length is an error. The sample's
  ``meta["haystack_source"]`` says which haystack it has (``essays+generated``, ``file:<name>``, ``noise``,
  ``needles``).
- The no-repetition guarantee is the essay haystack's and the ``needle`` haystack's (niah_multikey_2/3:
  every distractor has its own key and value). The ``noise`` haystack (niah_single_1, vt: "The grass is
  green. ...") repeats one passage by RULER's design.
- Word keys (``adjective-noun``) and the common-words pool (nouns + adjectives + verbs, deduplicated,
  sorted: 8,166 words with wonderwords 3.0) come from ``wonderwords``' lists as in RULER, but are drawn with
  the sample's own seeded generator. Past the pool's end, which only lists of more than ~8,100 distinct words
  reach (cwe at 128k tokens with tokenizers that spend few tokens on the list's numbers; SmolLM2's stays
  under 5,000), RULER takes words of another list (``english_words.json``); here they are made-up
  hyphenated pairs of pool words, unique and never built from the answers.
- Needles are placed at depths drawn from RULER's 40-point depth grid for every haystack type, and the
  depth of each needle is recorded in tokens.
- The QA tasks load SQuAD v2 / HotpotQA through ``datasets`` (or ``--qa-dir``) and are skipped, with a
  message, when the Hugging Face hub (or a local datasets cache) is not reachable.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from math import pi

from twilight.models import PASSKEY_FILLER as NOISE  # RULER's noise haystack is the passkey filler

from ..common import (
    EvalError,
    PromptEncoder,
    Sample,
    fit_largest,
    hub_reachable,
    offline_mode,
    rng_for,
    split_sentences,
)
from ..haystack import (
    INSTALL_HINT,
    Corpus,
    default_corpus,
    file_corpus,
    needle_key,
    wonderwords_available,
    word_pool,
)
from .base import Task

# RULER's 40 needle depths, in percent: round(linspace(0, 100, 40)).
DEPTHS = sorted({round(100 * i / 39) for i in range(40)})

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        # "assgined" is RULER's spelling; kept so prompts match the benchmark exactly.
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
        "are assgined the value {query}, they are: ",
        30),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\n"
        "Question: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
        "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:",
        32),
}
DOCUMENT = "Document {i}:\n{document}"


@dataclass(frozen=True)
class RulerSpec:
    kind: str                     # niah | variable_tracking | common_words_extraction | freq_words_extraction | qa
    haystack: str = "essay"       # niah: noise | essay | needle
    key_type: str = "words"       # niah: words | numbers | uuids
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    num_chains: int = 1           # vt
    num_hops: int = 4             # vt
    freq_cw: int = 30             # cwe: repeats of each common word
    freq_ucw: int = 3             # cwe: repeats of each uncommon word
    num_cw: int = 10              # cwe: number of common words
    alpha: float = 2.0            # fwe: Zipf exponent
    dataset: str = ""             # qa: squad | hotpotqa

    @property
    def metric(self) -> str:
        return "string_match_part" if self.kind == "qa" else "string_match_all"


RULER_TASKS: dict[str, RulerSpec] = {
    "niah_single_1": RulerSpec("niah", haystack="noise"),
    "niah_single_2": RulerSpec("niah", haystack="essay"),
    "niah_single_3": RulerSpec("niah", haystack="essay", value_type="uuids"),
    "niah_multikey_1": RulerSpec("niah", haystack="essay", num_keys=4),
    "niah_multikey_2": RulerSpec("niah", haystack="needle"),
    "niah_multikey_3": RulerSpec("niah", haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": RulerSpec("niah", haystack="essay", num_values=4),
    "niah_multiquery": RulerSpec("niah", haystack="essay", num_keys=4, num_queries=4),
    "vt": RulerSpec("variable_tracking"),
    "cwe": RulerSpec("common_words_extraction"),
    "fwe": RulerSpec("freq_words_extraction"),
    "qa_1": RulerSpec("qa", dataset="squad"),
    "qa_2": RulerSpec("qa", dataset="hotpotqa"),
}


@dataclass
class Built:
    """One candidate prompt: the task text, the answer prefix, the answers and the needles."""
    text: str
    prefix: str
    answers: list[str]
    context: str
    needles: list[tuple[str, int]]   # (needle text, requested depth in percent)


# --------------------------------------------------------------------------- random values

def _random_value(rng, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))          # 7 digits, as RULER
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return needle_key(rng)
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct(rng, kind: str, count: int, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = _random_value(rng, kind)
        if value not in out and value not in exclude:
            out.append(value)
    return out


def _insert_at_depths(units: list[str], needles: Sequence[tuple[str, int]]) -> list[str]:
    """Insert each needle at the unit boundary closest to ``depth``% of the haystack's characters.

    Characters track tokens closely for prose, so the needle's depth in tokens stays within a
    sentence of the request; for identical units this is boundary ``round(len(units) * depth / 100)``.
    """
    ends = list(accumulate(len(u) + 1 for u in units))        # characters up to each boundary
    total = ends[-1] if ends else 0
    boundaries = [0, *ends]
    out = list(units)
    for text, depth in sorted(needles, key=lambda nd: nd[1], reverse=True):
        target = total * depth / 100
        index = min(range(len(boundaries)), key=lambda i: (abs(boundaries[i] - target), i))
        out.insert(index, text)
    return out


def _fit(prompt_len: Callable[[int], int], budget: int, lo: int, what: str, hi: int | None = None) -> int:
    """:func:`fit_largest`'s answer in a handful of probes: prompts grow almost linearly in their units.

    Secant steps from ``lo`` aim just past where the line through the probes nearest the budget meets it,
    until a fitting and a non-fitting size are a few units apart; ``fit_largest`` then bisects between them.
    A 128k-token prompt takes ~8 tokenisations instead of ~32, and for a non-decreasing ``prompt_len`` the
    answer is ``fit_largest``'s (the largest fitting size).
    """
    memo: dict[int, int] = {}

    def f(n: int) -> int:
        if n not in memo:
            memo[n] = prompt_len(n)
        return memo[n]

    if f(lo) > budget:
        return fit_largest(f, budget, lo, what, hi=hi)   # its error message
    good, bad = lo, None
    probe = lo + 256 if hi is None else min(lo + 256, hi)
    for _ in range(12):
        if probe <= good or (bad is not None and probe >= bad):
            break
        if f(probe) <= budget:
            good = probe
        else:
            bad = probe
        if bad is not None and bad - good <= 8:
            break
        a, b = (good, bad) if bad is not None else (lo, good)
        slope = (f(b) - f(a)) / (b - a) if b > a else 0.0
        if slope <= 0:
            break
        probe = good + int((budget - f(good)) / slope) + 1
        if bad is not None:
            probe = min(probe, bad - 1)
        if hi is not None:
            probe = min(probe, hi)
    return fit_largest(f, budget, good, what, hi=bad - 1 if bad is not None else hi)


# --------------------------------------------------------------------------- task builders

def _singularise(template: str) -> str:
    """RULER's wording for a single expected value ("A special magic number is ...")."""
    return (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


def niah_builder(spec: RulerSpec, rng, corpus: Corpus | None = None) -> tuple[Callable[[int], Built], int]:
    """``(build(haystack_size), max_new_tokens)`` for a needle-in-a-haystack task.

    ``haystack_size`` counts noise lines, distractor needles or, for the essay haystack, words of ``corpus``
    (default: :func:`~twilight_eval.haystack.default_corpus`).
    """
    keys = _distinct(rng, spec.key_type, spec.num_keys)
    values = [_distinct(rng, spec.value_type, spec.num_values) for _ in keys]
    type_v = spec.value_type
    needles = [NEEDLE.format(type_needle_v=type_v, key=k, value=v)
               for k, vs in zip(keys, values, strict=True) for v in vs]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    placed = list(zip(needles, depths, strict=True))
    asked = sorted(rng.sample(range(spec.num_keys), spec.num_queries))
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template, prefix, max_new = TEMPLATES["niah"]
    if spec.num_queries * spec.num_values == 1:
        template, prefix, type_v = _singularise(template), _singularise(prefix), type_v[:-1]
    distractor_rng = rng_for(rng.random(), "distractors")
    distractors: list[str] = []
    taken = set(keys) | {v for vs in values for v in vs}

    def haystack_units(n: int) -> list[str]:
        if spec.haystack == "noise":
            return [NOISE] * n
        if spec.haystack == "essay":
            return split_sentences((corpus or default_corpus()).text(n))
        while len(distractors) < n:   # "needle" haystack: needles for other keys
            key, value = _distinct(distractor_rng, spec.key_type, 1, taken)[0], \
                _distinct(distractor_rng, spec.value_type, 1, taken)[0]
            taken.update((key, value))
            distractors.append(NEEDLE.format(type_needle_v=spec.value_type, key=key, value=value))
        return distractors[:n]

    def build(n: int) -> Built:
        joiner = " " if spec.haystack == "essay" else "\n"
        context = joiner.join(_insert_at_depths(haystack_units(n), placed))
        return Built(template.format(type_needle_v=type_v, context=context, query=query),
                     prefix.format(type_needle_v=type_v, query=query), answers, context, placed)

    return build, max_new


def _vt_chains(rng, num_chains: int, num_hops: int, name_len: int) -> tuple[list[list[str]], list[list[str]]]:
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    variables, chains = [], []
    for c in range(num_chains):
        vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain = [f"VAR {vs[0]} = {rng.randint(10000, 99999)}"]
        chain += [f"VAR {vs[j + 1]} = VAR {vs[j]}" for j in range(num_hops)]
        variables.append(vs)
        chains.append(chain)
    return variables, chains


def _vt_builder(rng, spec: RulerSpec, icl: bool) -> Callable[[int], Built]:
    """``build(num_noise_lines)`` for one variable-tracking prompt (``icl``: the short example)."""
    num_hops = min(spec.num_hops, 10) if icl else spec.num_hops
    variables, chains = _vt_chains(rng, spec.num_chains, num_hops, 3 if icl else 5)
    statements = [s for chain in chains for s in chain]
    placed = list(zip(statements, sorted(rng.sample(DEPTHS, len(statements))), strict=True))
    value = chains[0][0].split("=")[-1].strip()
    template, prefix, _ = TEMPLATES["variable_tracking"]
    prefix = prefix.format(num_v=len(variables[0]), query=value)

    def build(n: int) -> Built:
        context = "\n".join(_insert_at_depths([NOISE] * n, placed))
        return Built(template.format(context=context, query=value), prefix, variables[0], context, placed)

    return build


def vt_builder(spec: RulerSpec, rng, encoder: PromptEncoder, length: int) -> tuple[Callable[[int], Built], int]:
    """Variable tracking, preceded by one short solved example as in RULER."""
    icl_build = _vt_builder(rng, spec, icl=True)

    def icl_len(n: int) -> int:
        b = icl_build(n)
        return encoder.token_count(b.text + b.prefix)

    icl_budget = max(min(500, length // 4), icl_len(0))   # RULER: up to 500 tokens
    icl = icl_build(fit_largest(icl_len, icl_budget, 0, f"ruler vt example at --lengths {length}"))
    example = icl.text + icl.prefix + " ".join(icl.answers)
    build_main = _vt_builder(rng, spec, icl=False)

    def build(n: int) -> Built:
        b = build_main(n)
        return Built(example + "\n\n" + b.text, b.prefix, b.answers, b.context, b.needles)

    return build, TEMPLATES["variable_tracking"][2]


def _word_pool(rng) -> list[str]:
    """RULER's cwe pool (wonderwords' nouns + adjectives + verbs, deduplicated, sorted), shuffled by ``rng``."""
    pool = list(word_pool())
    rng.shuffle(pool)
    return pool


def _cwe_words(pool: list[str], n: int, num_cw: int) -> list[str]:
    """The first ``n`` words of ``pool``; past its end, made-up hyphenated pairs of pool words.

    The pairs are unique (none equals a pool word or another pair) and never built from the ``num_cw``
    common words, the answers.
    """
    if n <= len(pool):
        return pool[:n]
    words, seen = list(pool), set(pool)
    parts = pool[num_cw:]
    j = 0
    while len(words) < n:
        k, i = divmod(j, len(parts))
        j += 1
        word = f"{parts[i]}-{parts[(i + k + 1) % len(parts)]}"
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def cwe_builder(spec: RulerSpec, rng, length: int) -> tuple[Callable[[int], Built], int]:
    """Common words extraction: 10 words repeated ``freq_cw`` times among words repeated ``freq_ucw``."""
    template, prefix, max_new = TEMPLATES["common_words_extraction"]
    pool = _word_pool(rng)
    seed = rng.random()
    if length < 4096:   # RULER's smaller repeats for short contexts
        (ex_words, ex_cw, ex_ucw), (cw, ucw) = (20, 3, 1), (6, 1)
    else:
        (ex_words, ex_cw, ex_ucw), (cw, ucw) = (40, 10, 3), (spec.freq_cw, spec.freq_ucw)

    def word_list(words: list[str], common_repeats: int, uncommon_repeats: int, salt: object) -> tuple[str, list[str]]:
        common, uncommon = words[:spec.num_cw], words[spec.num_cw:]
        items = common * common_repeats + uncommon * uncommon_repeats
        rng_for(seed, salt, len(words)).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

    example_words = pool[::-1][:ex_words]   # disjoint from the test's words below ~8,100 of them
    ex_context, ex_answer = word_list(example_words, ex_cw, ex_ucw, "example")
    example = (template.format(context=ex_context) + prefix + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))

    def build(n: int) -> Built:
        context, answer = word_list(_cwe_words(pool, n, spec.num_cw), cw, ucw, "test")
        return Built(example + "\n" + template.format(context=context), prefix, answer, context, [])

    return build, max_new


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return pi ** 2 / 6
    terms = 100_000   # partial sum plus the integral tail
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def fwe_builder(spec: RulerSpec, rng) -> tuple[Callable[[int], Built], int]:
    """Frequent words extraction: coded words with Zipf(alpha) counts; the top one is '...' noise."""
    template, prefix, max_new = TEMPLATES["freq_words_extraction"]
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < 2000:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    vocab[0] = "..."
    seed, zeta = rng.random(), _zeta(spec.alpha)

    def build(n: int) -> Built:
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k ** -spec.alpha / zeta))]
        rng_for(seed, n).shuffle(words)
        context = " ".join(words)
        return Built(template.format(context=context), prefix, vocab[1:4], context, [])

    return build, max_new


# --------------------------------------------------------------------------- QA data

def squad_from_rows(rows, paragraphs=()) -> tuple[list[dict], list[str]]:
    """SQuAD v2 dev questions that have answers, with paragraphs of the same article as extra context.

    ``rows``: dicts with ``title``, ``context``, ``question`` and ``answers["text"]`` (the ``datasets`` layout);
    ``paragraphs``: more ``(title, context)`` pairs (the official file's paragraphs without questions).
    """
    rows = list(rows)
    pairs = [(r["title"], r["context"]) for r in rows] + list(paragraphs)
    docs = sorted({context for _, context in pairs})
    index = {d: i for i, d in enumerate(docs)}
    by_title: dict[str, set[int]] = {}
    for title, context in pairs:
        by_title.setdefault(title, set()).add(index[context])
    qas = []
    for r in rows:
        if r["answers"]["text"]:
            own = index[r["context"]]
            qas.append({"query": r["question"], "outputs": list(dict.fromkeys(r["answers"]["text"])),
                        "context": [own], "more_context": sorted(by_title[r["title"]] - {own})})
    return qas, docs


def hotpotqa_from_rows(rows) -> tuple[list[dict], list[str]]:
    """HotpotQA (distractor) dev questions; each comes with its own 10 paragraphs.

    ``rows``: dicts with ``question``, ``answer`` and ``context`` ``{"title": [...], "sentences": [[...], ...]}``.
    """
    rows = list(rows)

    def paragraphs(row):
        return [f"{t}\n{''.join(s)}" for t, s in zip(row["context"]["title"], row["context"]["sentences"],
                                                          strict=True)]

    docs = sorted({p for r in rows for p in paragraphs(r)})
    index = {d: i for i, d in enumerate(docs)}
    qas = [{"query": r["question"], "outputs": [r["answer"]], "context": [index[p] for p in paragraphs(r)],
            "more_context": []} for r in rows]
    return qas, docs


def load_squad() -> tuple[list[dict], list[str]]:
    import datasets
    return squad_from_rows(datasets.load_dataset("rajpurkar/squad_v2", split="validation"))


def load_hotpotqa() -> tuple[list[dict], list[str]]:
    import datasets
    return hotpotqa_from_rows(datasets.load_dataset("hotpotqa/hotpot_qa", "distractor", split="validation"))


def read_squad_json(path: str) -> tuple[list[dict], list[str]]:
    """SQuAD's own dev file (``dev-v2.0.json``: ``data[].paragraphs[].qas[]``), as RULER reads ``squad.json``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    rows = [{"title": article["title"], "context": para["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa.get("answers", [])]}}
            for article in data for para in article["paragraphs"] for qa in para["qas"]]
    return squad_from_rows(rows, [(a["title"], p["context"]) for a in data for p in a["paragraphs"]])


def read_hotpotqa_json(path: str) -> tuple[list[dict], list[str]]:
    """HotpotQA's own dev file (``hotpot_dev_distractor_v1.json``: a list of ``{question, answer, context:
    [[title, [sentences]], ...]}``), as RULER reads ``hotpotqa.json``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = [{"question": r["question"], "answer": r["answer"],
             "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}}
            for r in data]
    return hotpotqa_from_rows(rows)


QA_LOADERS: dict[str, tuple[str, Callable[[], tuple[list[dict], list[str]]]]] = {
    "squad": ("SQuAD v2 (rajpurkar/squad_v2)", load_squad),
    "hotpotqa": ("HotpotQA (hotpotqa/hotpot_qa)", load_hotpotqa),
}
#: ``--qa-dir`` files, named as RULER names them, and their readers.
QA_FILES: dict[str, tuple[str, Callable[[str], tuple[list[dict], list[str]]]]] = {
    "squad": ("squad.json", read_squad_json),
    "hotpotqa": ("hotpotqa.json", read_hotpotqa_json),
}


def qa_builder(spec: RulerSpec, rng, qas: list[dict], docs: list[str]) -> tuple[Callable[[int], Built], int]:
    template, prefix, max_new = TEMPLATES["qa"]
    qa = qas[rng.randrange(len(qas))]
    gold, more = list(qa["context"]), list(qa["more_context"])
    used = set(gold) | set(more)
    others = [i for i in range(len(docs)) if i not in used]
    rng.shuffle(more)
    rng.shuffle(others)
    extra = more + others   # same-article paragraphs first, as RULER
    seed = rng.random()

    def build(n: int) -> Built:
        chosen = gold + extra[:max(0, n - len(gold))]
        chosen = [docs[i] for i in chosen]
        rng_for(seed, n).shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
        return Built(template.format(context=context, query=qa["query"]), prefix, qa["outputs"], context, [])

    return build, max_new


# --------------------------------------------------------------------------- the task

#: ``meta["haystack_source"]`` of the haystacks that are not a corpus.
HAYSTACK_SOURCES = {"noise": "noise", "needle": "needles"}


def _needs_wonderwords(spec: RulerSpec, generated_haystack: bool) -> bool:
    """Whether a task draws from wonderwords' lists: word keys or values, the cwe pool, the generated haystack."""
    if spec.kind == "common_words_extraction":
        return True
    return spec.kind == "niah" and ("words" in (spec.key_type, spec.value_type)
                                    or (spec.haystack == "essay" and generated_haystack))


def _postprocess(text: str) -> str:
    """RULER's cleanup: strip and turn control characters into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


class RulerTask(Task):
    name = "ruler"
    help = "RULER synthetic tasks (NIAH x8, variable tracking, common/frequent words, QA)"
    default_lengths = (2048, 4096)
    default_samples = 2
    score_name = "accuracy (%)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=list(RULER_TASKS),
                            metavar="TASK", help="RULER tasks to run (default: all 13): "
                                                 + ", ".join(RULER_TASKS))
        parser.add_argument("--qa-dir", metavar="DIR",
                            help="local QA data, as RULER names it: squad.json (SQuAD v2 dev) for qa_1 and "
                                 "hotpotqa.json (HotpotQA dev, distractor) for qa_2 (default: the hub, via datasets)")
        parser.add_argument("--haystack-file", metavar="PATH",
                            help="UTF-8 text for the essay haystack (niah_single_2/3, niah_multikey_1, "
                                 "niah_multivalue, niah_multiquery), e.g. PG-19 books, used from its start and "
                                 "never repeated: it must be long enough for every length (default: the shipped "
                                 "essays, then generated prose that repeats no sentence)")

    def _tasks(self) -> list[str]:
        return list(dict.fromkeys(self.args.tasks))

    def _haystack_file(self) -> str | None:
        return getattr(self.args, "haystack_file", None)

    def _essay_tasks(self) -> list[str]:
        return [t for t in self._tasks() if RULER_TASKS[t].kind == "niah" and RULER_TASKS[t].haystack == "essay"]

    def _corpus(self) -> Corpus:
        path = self._haystack_file()
        return file_corpus(path) if path is not None else default_corpus()

    def check_arguments(self) -> None:
        self._check_wonderwords()
        self._check_haystack_file()
        qa_dir = getattr(self.args, "qa_dir", None)
        if qa_dir is None:
            return
        if not os.path.isdir(qa_dir):
            raise EvalError(f"--qa-dir: {qa_dir} is not a directory")
        for task in self._tasks():
            spec = RULER_TASKS[task]
            if spec.kind == "qa" and not os.path.isfile(os.path.join(qa_dir, QA_FILES[spec.dataset][0])):
                raise EvalError(f"--qa-dir: {task} needs {os.path.join(qa_dir, QA_FILES[spec.dataset][0])}, which "
                                "does not exist")

    def _check_wonderwords(self) -> None:
        """Word keys, the cwe pool and the generated haystack need ``wonderwords``: say so before a model loads."""
        generated = self._haystack_file() is None
        needing = [t for t in self._tasks() if _needs_wonderwords(RULER_TASKS[t], generated)]
        if needing and not wonderwords_available():
            raise EvalError(f"ruler {', '.join(needing)} need the wonderwords package (RULER's word lists), which is "
                            f"not installed: {INSTALL_HINT}")

    def _check_haystack_file(self) -> None:
        """``--haystack-file``: readable UTF-8 text, and not obviously too short for the longest length.

        A token spans at least one byte, so a file of fewer bytes than a length's haystack needs tokens cannot
        fill it (checked here, before the model loads); the exact check is :meth:`_check_haystack_length`.
        """
        path = self._haystack_file()
        if path is None:
            return
        corpus = file_corpus(path)
        if not self._essay_tasks():
            self.notes.append(f"ruler: --haystack-file {path} is not used: none of the selected tasks has an essay "
                              "haystack (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery)")
            return
        lengths = getattr(self.args, "lengths", None) or self.default_lengths
        longest = max(lengths)
        if corpus.bytes < longest - self._HAYSTACK_FILE_MARGIN:
            raise EvalError(f"--haystack-file: {path} is too short for --lengths {longest}: {corpus.bytes} bytes "
                            f"({corpus.size} words) make at most {corpus.bytes} tokens of haystack; use a longer text "
                            "(it is never repeated)")

    #: Tokens of a prompt that are not haystack (instructions, question, chat template, needles) are at most this.
    _HAYSTACK_FILE_MARGIN = 2048

    def _check_haystack_length(self, encoder: PromptEncoder, lengths: Sequence[int]) -> None:
        """Before any sample is built: ``--haystack-file`` holds enough text for the longest length of every
        essay task (a file of at least that many words does: every word is a token or more)."""
        path = self._haystack_file()
        longest = max(lengths)
        if path is None or not self._essay_tasks() or file_corpus(path).size >= longest:
            return
        corpus = file_corpus(path)
        for task in self._essay_tasks():
            build, max_new = niah_builder(RULER_TASKS[task], rng_for(0, "ruler haystack check", task), corpus)
            b = build(corpus.size)
            tokens = len(encoder.encode(encoder.render(b.text, b.prefix)))
            if tokens <= longest - max_new:
                raise EvalError(self._too_short(task, longest, corpus, tokens))

    @staticmethod
    def _too_short(task: str, length: int, corpus: Corpus, tokens: int) -> str:
        return (f"--haystack-file: {getattr(corpus, 'path', corpus.source)} is too short for ruler {task} at --lengths "
                f"{length}: all of its {corpus.size} words make a prompt of only {tokens} tokens (it is never "
                "repeated); use a longer text")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self._qa_cache: dict[str, tuple[list[dict], list[str]] | str] = {}

    def _qa_data(self, dataset: str) -> tuple[list[dict], list[str]] | str:
        """``(questions, documents)`` of a QA source, or why it could not be loaded."""
        qa_dir = getattr(self.args, "qa_dir", None)
        if dataset not in self._qa_cache and qa_dir is not None:
            name, reader = QA_FILES[dataset]
            try:
                self._qa_cache[dataset] = reader(os.path.join(qa_dir, name))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise EvalError(f"--qa-dir: cannot read {os.path.join(qa_dir, name)}: {type(err).__name__}: "
                                f"{err}") from err
        if dataset not in self._qa_cache:
            label, loader = QA_LOADERS[dataset]
            ok, reason = hub_reachable()
            if not ok and not offline_mode():
                self._qa_cache[dataset] = f"{label} could not be loaded through `datasets`: {reason}"
            else:   # online, or offline with possibly cached data
                try:
                    self._qa_cache[dataset] = loader()
                except Exception as err:  # noqa: BLE001 -- any failure to load means "skip"
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    self._qa_cache[dataset] = f"{label} could not be loaded through `datasets`: {first}"
        return self._qa_cache[dataset]

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        num_samples = num_samples or self.default_samples
        self._check_wonderwords()
        self._check_haystack_length(encoder, lengths)
        samples: list[Sample] = []
        for task in self._tasks():
            spec = RULER_TASKS[task]
            if spec.kind == "qa":
                data = self._qa_data(spec.dataset)
                if isinstance(data, str):
                    self.notes.append(f"ruler: skipped {task}: {data}")
                    continue
            for length in lengths:
                for index in range(num_samples):
                    rng = rng_for(seed, "ruler", task, length, index)
                    samples.append(self._build_one(task, spec, rng, encoder, length, index))
        if not samples:
            raise EvalError("ruler: no samples to evaluate (every selected task was skipped)")
        return samples

    def _build_one(self, task: str, spec: RulerSpec, rng, encoder: PromptEncoder, length: int,
                   index: int) -> Sample:
        corpus = self._corpus() if spec.kind == "niah" and spec.haystack == "essay" else None
        if spec.kind == "niah":
            build, max_new = niah_builder(spec, rng, corpus)
        elif spec.kind == "variable_tracking":
            build, max_new = vt_builder(spec, rng, encoder, length)
        elif spec.kind == "common_words_extraction":
            build, max_new = cwe_builder(spec, rng, length)
        elif spec.kind == "freq_words_extraction":
            build, max_new = fwe_builder(spec, rng)
        else:
            qas, docs = self._qa_data(spec.dataset)
            build, max_new = qa_builder(spec, rng, qas, docs)

        def prompt_len(n: int) -> int:
            b = build(n)
            return len(encoder.encode(encoder.render(b.text, b.prefix)))

        smallest = {"common_words_extraction": spec.num_cw + 1, "freq_words_extraction": 1,
                    "qa": 1}.get(spec.kind, 0)
        cap = len(self._qa_data(spec.dataset)[1]) if spec.kind == "qa" else corpus.size if corpus else None
        n = _fit(prompt_len, length - max_new, smallest, f"ruler {task}: --lengths {length}", hi=cap)
        if corpus is not None and n == corpus.size:   # the whole file fits: it cannot fill the length
            raise EvalError(self._too_short(task, length, corpus, prompt_len(n)))
        built = build(n)
        prompt = encoder.render(built.text, built.prefix)
        ids = encoder.encode(prompt)
        meta: dict = {"haystack_units": n}
        if spec.kind == "niah":
            meta["haystack_source"] = corpus.source if corpus else HAYSTACK_SOURCES[spec.haystack]
            if getattr(corpus, "sha1", None):
                meta["haystack_sha1"] = corpus.sha1
        ctx_char = prompt.find(built.context) if built.context else -1
        if ctx_char >= 0:
            start = encoder.char_to_token(prompt, ctx_char)
            end = encoder.char_to_token(prompt, ctx_char + len(built.context))
            meta.update(context_start=start, context_end=end, context_tokens=end - start)
            # token_depth: the needle's position within the haystack proper (needle tokens excluded).
            found = sorted((encoder.char_to_token(prompt, prompt.index(needle, ctx_char)), needle, depth)
                           for needle, depth in built.needles)
            sizes = [encoder.token_count(needle) for _, needle, _ in found]
            haystack_tokens = max(end - start - sum(sizes), 1)
            needles = [{"text": needle, "depth": depth, "token": tok,
                        "token_depth": round((tok - start - sum(sizes[:i])) / haystack_tokens, 4)}
                       for i, (tok, needle, depth) in enumerate(found)]
            if needles:
                meta["needles"] = needles
            if len(needles) == 1:
                meta["depth"] = needles[0]["depth"]
        return Sample(id=f"{task}/L{length}/s{index}", task=task, length=length, input_ids=ids,
                      answers=list(built.answers), max_new_tokens=max_new, metric=spec.metric, meta=meta,
                      question_start=meta.get("context_end"))

    def postprocess(self, sample: Sample, text: str) -> str:
        return _postprocess(text)
