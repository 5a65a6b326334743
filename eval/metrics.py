"""Metrics of RULER and LongBench, implemented from their definitions.

Every metric has the signature ``metric(prediction, answers, **meta) -> float`` with a value
in ``[0, 1]`` (reports multiply by 100). LongBench metrics score the prediction against each
reference answer and keep the best; RULER's two metrics look at all references at once.

RULER (Hsieh et al., 2024):

- ``string_match_all``: fraction of the references that occur in the prediction
  (case-insensitive), e.g. all values of a multi-value needle.
- ``string_match_part``: 1 if any reference occurs in the prediction (QA tasks).

LongBench (Bai et al., 2023):

- ``qa_f1``: token-level F1 after SQuAD-style normalisation (lower case, no punctuation,
  no articles ``a/an/the``, single spaces).
- ``rouge_l``: the ``rouge`` package's ROUGE-L F (``Rouge().get_scores``: summary-level union LCS over
  sentences, divided by the numbers of *distinct* words), 0 when it raises (an empty side), as LongBench.
- ``classification``: the classes named in the prediction, ignoring classes that are a
  proper substring of the reference; 1/len(matches) when the reference is among them.
- ``retrieval``: the paragraph number of the reference ("Paragraph 7") against every number
  in the prediction; the fraction of those numbers that are right.
- ``count``: the same for a count ("3"): the fraction of numbers in the prediction that equal it.
- ``code_sim``: ``fuzzywuzzy.fuzz.ratio`` / 100 (an integer percentage, as LongBench: difflib's
  ratio rounded; with ``python-Levenshtein`` installed fuzzywuzzy uses that library's ratio, which LongBench's
  requirements do not install) between the reference and the first line of the prediction that is not blank
  and not a comment or code fence.
- ``*_zh`` variants for Chinese, as LongBench: ``qa_f1_zh`` is the F1 of ``jieba`` words (each word lower-cased
  and stripped of punctuation and spaces, empty words dropped); ``rouge_l_zh`` is ``rouge_l`` over the
  ``jieba`` words joined by spaces.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

# --------------------------------------------------------------------------- RULER


def string_match_all(prediction: str, answers: Sequence[str], **_) -> float:
    """Fraction of ``answers`` contained in ``prediction`` (case-insensitive)."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str], **_) -> float:
    """1.0 if any of ``answers`` is contained in ``prediction`` (case-insensitive), else 0.0."""
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in answers))


# --------------------------------------------------------------------------- LongBench: QA F1

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_ZH_PUNCTUATION = set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
) | _PUNCTUATION


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench normalisation: lower case, drop punctuation, articles and extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Harmonic mean of precision and recall of the multiset overlap of two token lists."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def jieba_words(text: str) -> list[str]:
    """``jieba``'s words of Chinese text (accurate mode), as LongBench cuts them."""
    import jieba
    jieba.setLogLevel(60)  # no "Building prefix dict" chatter on stderr
    return list(jieba.cut(text, cut_all=False))


def normalize_zh_word(word: str) -> str:
    """LongBench's Chinese normalisation of one word: lower case, no punctuation (Chinese or ASCII), no spaces."""
    return "".join(ch for ch in word.lower() if ch not in _ZH_PUNCTUATION and not ch.isspace())


def qa_f1_one(prediction: str, reference: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh_one(prediction: str, reference: str) -> float:
    def words(text: str) -> list[str]:
        return [w for w in map(normalize_zh_word, jieba_words(text)) if w]
    return token_f1(words(prediction), words(reference))


# --------------------------------------------------------------------------- LongBench: ROUGE-L

def rouge_l_one(prediction: str, reference: str) -> float:
    """The ``rouge`` package's ROUGE-L F; 0 when it cannot score the pair (an empty side), as LongBench."""
    from rouge import Rouge
    try:
        return float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError, ZeroDivisionError):
        return 0.0


def rouge_l_zh_one(prediction: str, reference: str) -> float:
    return rouge_l_one(" ".join(jieba_words(prediction)), " ".join(jieba_words(reference)))


# --------------------------------------------------------------------------- LongBench: others

def classification_one(prediction: str, reference: str, all_classes: Sequence[str] = ()) -> float:
    matches = [c for c in all_classes if c in prediction]
    # A class that is only part of the reference's name ("location" in "other location") is no hit.
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _number_hit_rate(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def retrieval_one(prediction: str, reference: str, pattern: str = r"Paragraph (\d+)") -> float:
    found = re.findall(pattern, reference)
    return _number_hit_rate(prediction, found[0]) if found else 0.0


def retrieval_zh_one(prediction: str, reference: str) -> float:
    return retrieval_one(prediction, reference, pattern=r"段落(\d+)")


def count_one(prediction: str, reference: str) -> float:
    return _number_hit_rate(prediction, str(reference).strip())


def first_code_line(prediction: str) -> str:
    """The first non-blank line that is not a comment (``#``, ``//``) or a code fence."""
    for line in prediction.split("\n"):
        if line.strip() and "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_one(prediction: str, reference: str) -> float:
    import warnings
    with warnings.catch_warnings():  # "using slow pure-python SequenceMatcher": the ratio LongBench computed
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    return fuzz.ratio(first_code_line(prediction), reference) / 100.0


# --------------------------------------------------------------------------- registry

def best_over_answers(one: Callable[..., float]) -> Callable[..., float]:
    """Lift a one-reference metric to ``(prediction, answers, **meta)``: the best reference wins."""

    def metric(prediction: str, answers: Sequence[str], all_classes: Sequence[str] = (), **_) -> float:
        kwargs = {"all_classes": all_classes} if one is classification_one else {}
        return max((one(prediction, ref, **kwargs) for ref in answers), default=0.0)

    metric.__name__ = one.__name__.removesuffix("_one")
    metric.__doc__ = f"Best of ``{one.__name__}`` over the reference answers."
    return metric


qa_f1 = best_over_answers(qa_f1_one)
qa_f1_zh = best_over_answers(qa_f1_zh_one)
rouge_l = best_over_answers(rouge_l_one)
rouge_l_zh = best_over_answers(rouge_l_zh_one)
classification = best_over_answers(classification_one)
retrieval = best_over_answers(retrieval_one)
retrieval_zh = best_over_answers(retrieval_zh_one)
count = best_over_answers(count_one)
code_sim = best_over_answers(code_sim_one)

METRICS: dict[str, Callable[..., float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


#: The modules a metric imports when it first scores (``pip install`` names in ``missing_dependencies``).
METRIC_MODULES = {"rouge_l": ("rouge",), "rouge_l_zh": ("rouge", "jieba"), "qa_f1_zh": ("jieba",),
                  "code_sim": ("fuzzywuzzy",)}
_PIP_NAMES: dict[str, str] = {}  # module -> pip name where they differ


def missing_dependencies(metric_names: Sequence[str]) -> list[str]:
    """``pip install`` names of what the metrics ``metric_names`` need and this environment lacks."""
    import importlib.util

    modules = {m for name in metric_names for m in METRIC_MODULES.get(name, ())}
    return sorted(_PIP_NAMES.get(m, m) for m in modules if importlib.util.find_spec(m) is None)


def score(metric: str, prediction: str, answers: Sequence[str], **meta) -> float:
    """Score ``prediction`` with the metric called ``metric``."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None
    return float(fn(prediction, answers, **meta))
