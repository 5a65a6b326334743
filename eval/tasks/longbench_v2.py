"""LongBench v2 (Bai et al., 2024; github.com/THUDM/LongBench, MIT): 503 four-choice questions on long contexts.

The protocol of the benchmark's ``pred.py`` without chain of thought: its 0-shot prompt template (``TEMPLATE``,
the document between ``<text></text>``, then the question, the four choices and the answer format asked for),
middle truncation of the prompt's tokens to the length (the first half and the last half are kept, decoded
together), the chat template, up to 128 generated tokens, the answer letter read with upstream's two regular
expressions (``extract_answer``) and accuracy as the score. Generation is greedy (upstream samples at temperature
0.1 through an API server). Lengths count the chat template and the 128 new tokens, as every task here.

Rows are grouped by difficulty (``easy`` / ``hard``: the table's rows); their length category (``short`` /
``medium`` / ``long``, in words of context) is ``meta["bucket"]``, reported per bucket in the summary.
Each sample's ``question_start`` is the token where the prompt's part after the document begins (``</text>``,
the question, the choices and the chat template's tail), for the protocol that decodes the question.

Data: ``--data-file``, a local copy of the benchmark's ``data.json`` (a JSON list of rows, or JSONL with one row
per line); otherwise the hub dataset ``THUDM/LongBench-v2`` (split ``train``) through ``datasets``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence

from ..common import EvalError, PromptEncoder, Sample, hub_reachable, offline_mode, rng_for
from .base import Task

TEMPLATE = ("Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
            "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
            "(D) $C_D$\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")
#: Where the prompt's part after the document starts (the ``</text>`` closing it).
QUESTION_MARKER = "</text>\n\nWhat is the correct answer to this question:"
ANSWER_PATTERNS = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))
MAX_NEW_TOKENS = 128
FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
          "choice_D", "answer", "context")
HUB_DATASET = "THUDM/LongBench-v2"
DATA_HINT = "download the benchmark's data.json elsewhere and pass --data-file PATH"


def build_prompt(row: dict) -> str:
    """The 0-shot prompt of a row: ``TEMPLATE`` with the stripped document, question and choices, filled in
    upstream's order."""
    prompt = TEMPLATE.replace("$DOC$", row["context"].strip()).replace("$Q$", row["question"].strip())
    for letter in "ABCD":
        prompt = prompt.replace(f"$C_{letter}$", row[f"choice_{letter}"].strip())
    return prompt


def extract_answer(response: str) -> str | None:
    """The chosen letter: ``The correct answer is (X)``, else ``The correct answer is X`` (bold marks ignored),
    else ``None`` (scored wrong)."""
    response = response.replace("*", "")
    for pattern in ANSWER_PATTERNS:
        match = pattern.search(response)
        if match:
            return match.group(1)
    return None


def truncate_middle(tokenizer, prompt: str, ids: Sequence[int], max_tokens: int) -> tuple[str, str]:
    """LongBench v2's truncation: keep the first ``max_tokens // 2`` and the last ``max_tokens - max_tokens // 2``
    tokens of the prompt, decoded together.

    Args:
        prompt: the prompt text; ``ids``: its tokens (without special tokens).
    Returns:
        ``(text, tail)``: the (truncated) prompt and the text of its kept last part; both ``prompt`` when it fits.
    """
    if len(ids) <= max_tokens:
        return prompt, prompt
    half = max_tokens // 2
    kept_tail = list(ids[len(ids) - (max_tokens - half):])
    return (tokenizer.decode(list(ids[:half]) + kept_tail, skip_special_tokens=True),
            tokenizer.decode(kept_tail, skip_special_tokens=True))


def read_data_file(path: str) -> list[dict]:
    """Rows of a local copy of LongBench v2's ``data.json``: a JSON list of rows, or JSONL (one row per line).

    Raises:
        EvalError: unreadable or malformed file, or a row without one of ``FIELDS`` or with an answer not in A-D.
    """
    try:
        with open(path, encoding="utf-8") as f:
            is_list = f.read(256).lstrip().startswith("[")
            f.seek(0)
            if is_list:
                rows = json.load(f)
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except OSError as err:
        raise EvalError(f"--data-file: cannot read {path}: {err.strerror}") from err
    except (ValueError, UnicodeDecodeError) as err:   # json.JSONDecodeError is a ValueError
        raise EvalError(f"--data-file: {path} is neither a JSON list nor JSONL ({err})") from err
    for i, row in enumerate(rows):
        missing = [name for name in FIELDS if name not in row] if isinstance(row, dict) else list(FIELDS)
        if missing:
            raise EvalError(f"--data-file: row {i} of {path} lacks {', '.join(missing)} (LongBench v2's rows have "
                            f"{', '.join(FIELDS)})")
        if row["answer"] not in ("A", "B", "C", "D"):
            raise EvalError(f"--data-file: row {i} of {path} has answer {row['answer']!r}, not A, B, C or D")
    return rows


def load_rows(data_file: str | None) -> Sequence[dict]:
    """The benchmark's rows: from ``data_file``, else from the hub through ``datasets`` (or its cache when
    ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set)."""
    if data_file:
        return read_data_file(data_file)
    ok, reason = hub_reachable()
    if not ok and not offline_mode():
        raise EvalError(f"longbench-v2: cannot load {HUB_DATASET} from the hub: {reason}; {DATA_HINT}")
    import datasets
    try:
        return datasets.load_dataset(HUB_DATASET, split="train")
    except Exception as err:  # noqa: BLE001 -- report any loading failure the same way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalError(f"longbench-v2: cannot load {HUB_DATASET} through `datasets` ({first}); {DATA_HINT}") from err


class LongBenchV2Task(Task):
    name = "longbench-v2"
    help = "LongBench v2: multiple-choice questions on long documents, with the benchmark's prompt and truncation"
    default_lengths = ()        # default: the model's maximum context
    default_samples = 0         # 0: every row
    score_name = "accuracy (%)"
    average_over_groups = False  # "overall" is the accuracy over every question, as the benchmark reports it
    buckets_title = "By length category (short / medium / long)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data-file", metavar="PATH",
                            help="local copy of LongBench v2's data.json (a JSON list or JSONL; default: the hub "
                                 f"dataset {HUB_DATASET} through `datasets`)")

    def check_arguments(self) -> None:
        if self.args.data_file and not os.path.isfile(self.args.data_file):
            raise EvalError(f"--data-file: {self.args.data_file} not found (expected a local copy of LongBench v2's "
                            "data.json)")

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        rows = load_rows(self.args.data_file)
        order = list(range(len(rows)))
        if num_samples and num_samples < len(order):   # a seeded subset, kept in file order
            order = sorted(rng_for(seed, self.name).sample(order, num_samples))
        samples: list[Sample] = []
        for i in order:
            row = rows[i]
            prompt = build_prompt(row)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]   # once per row, for every length
            for length in lengths:
                samples.append(self._sample(row, i, prompt, ids, length, tokenizer, encoder))
        if not samples:
            raise EvalError("longbench-v2: no samples to evaluate (empty data?)")
        cut = [s for s in samples if s.question_start is None]
        if cut:
            self.notes.append(f"longbench-v2: in {len(cut)} prompt(s) (e.g. {cut[0].id}) the middle truncation cut "
                              "into the question; they are prefilled whole, the question is not decoded apart")
        return samples

    def _sample(self, row: dict, index: int, prompt: str, ids: Sequence[int], length: int, tokenizer,
                encoder: PromptEncoder) -> Sample:
        overhead = len(encoder.encode(encoder.render("")))   # chat template and special tokens
        room = length - MAX_NEW_TOKENS - overhead
        if room < 16:
            raise EvalError(f"longbench-v2: --lengths {length} is too short for {MAX_NEW_TOKENS} new tokens plus "
                            "the prompt")
        while True:   # re-encoding decoded text can differ by a few tokens: trim until it fits
            text, tail = truncate_middle(tokenizer, prompt, ids, room)
            rendered = encoder.render(text)
            input_ids = encoder.encode(rendered)
            if len(input_ids) + MAX_NEW_TOKENS <= length:
                break
            room -= max(1, len(input_ids) + MAX_NEW_TOKENS - length)
        meta = {"bucket": row["length"], "difficulty": row["difficulty"], "domain": row["domain"],
                "sub_domain": row["sub_domain"], "row": index, "row_id": row["_id"], "truncated": len(ids) > room}
        question_start = None
        if QUESTION_MARKER in tail:   # the whole part after the document survived the truncation
            question_start = encoder.char_to_token(rendered, rendered.rfind(QUESTION_MARKER))
        else:
            meta["note"] = ("the middle truncation cut into the question: the whole prompt is prefilled "
                            "(no question_start)")
        return Sample(id=f"{self.name}/{row['_id']}/L{length}", task=self.name, length=length, input_ids=input_ids,
                      answers=[row["answer"]], max_new_tokens=MAX_NEW_TOKENS, metric="choice", group=row["difficulty"],
                      meta=meta, question_start=question_start)

    def score_generation(self, sample: Sample, out) -> dict:
        """Accuracy of the letter ``extract_answer`` reads in the response; the record keeps both."""
        prediction = self.postprocess(sample, out.text)
        choice = extract_answer(prediction)
        return {"prediction": prediction, "choice": choice, "score": float(choice == sample.answers[0]),
                "generated_tokens": out.num_tokens}
