"""Perplexity of a long text, where every scored token is predicted by a decode step.

Sparse attention only acts on decode steps (prefill stays dense), so a plain teacher-forced
forward pass would never exercise it. Instead, for a window of ``L`` tokens the first
``L - D - 1`` are prefilled, then ``model.generate`` is forced to emit the true next tokens
one by one; the logits of the ``D`` decode steps score the last ``D`` tokens of the window
(``--decode-tokens``).

The text is ``--text``: one UTF-8 file, or a directory of ``.txt`` files, one book each (like PG-19's test split),
or by default the package's own essays (about 6k tokens with the embedded model's tokenizer). Each book is tokenized
once; a window never spans two books. In a single text the first window starts at its beginning and the others at
seeded offsets; in a directory every window lies at a seeded offset of a seeded book, the books long enough for the
length taken in a seeded order (distinct books while there are enough), shorter ones skipped.
"""
from __future__ import annotations

import argparse
import math
import os
from array import array
from collections.abc import Sequence

from .common import EvalError, PromptEncoder, Sample, essay_text, positive_int, rng_for
from .tasks.base import Task

DEFAULT_DECODE_TOKENS = 128


def forced_decode_nll(model, input_ids: list[int], num_prefill: int) -> list[float]:
    """Negative log-likelihoods of ``input_ids[num_prefill + 1:]``, each from a decode step.

    Prefills ``input_ids[:num_prefill]``, then forces generation of the remaining tokens; the
    first forced token comes from the prefill logits and is not scored.

    Returns:
        ``len(input_ids) - num_prefill - 1`` values, in nats.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    targets = input_ids[num_prefill:]

    class ForceTargets(LogitsProcessor):
        def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            step = ids.shape[1] - num_prefill
            forced = torch.full_like(scores, float("-inf"))
            forced[:, targets[step]] = 0.0
            return forced

    device = next(model.parameters()).device
    prefix = torch.tensor([input_ids[:num_prefill]], dtype=torch.long, device=device)  # [1, P]
    with torch.inference_mode():
        out = model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                             max_new_tokens=len(targets), do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None,
                             logits_processor=LogitsProcessorList([ForceTargets()]),
                             output_logits=True, return_dict_in_generate=True)
    nll = []
    for step, logits in enumerate(out.logits[1:], start=1):   # logits[0] came from the prefill
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)  # [V]
        nll.append(-float(logprobs[targets[step]]))
    return nll


class PerplexityTask(Task):
    name = "ppl"
    help = "perplexity of long texts or books; every scored token is produced by a (sparse) decode step"
    default_lengths = (1024, 2048, 4096)
    default_samples = 1
    higher_is_better = False
    generates = False
    score_name = "perplexity"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self._books: list[tuple[str, array]] | None = None   # (name, token ids) of each book, tokenized once

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--text", metavar="FILE|DIR",
                            help="UTF-8 text file to score, or a directory of .txt files, one book each (e.g. PG-19's "
                                 "test split; windows never span two books); default: the essays shipped with the "
                                 "package")
        parser.add_argument("--decode-tokens", type=positive_int, default=DEFAULT_DECODE_TOKENS, metavar="N",
                            help=f"tokens scored at the end of each window, one decode step each "
                                 f"(default: {DEFAULT_DECODE_TOKENS})")

    def check_arguments(self) -> None:
        for path in self.text_files():
            try:
                with open(path, encoding="utf-8") as f:
                    f.read(1)
            except OSError as err:
                raise EvalError(f"--text: cannot read {path}: {err.strerror}") from err

    def is_directory(self) -> bool:
        """Whether ``--text`` names a directory of books."""
        return bool(self.args.text) and os.path.isdir(self.args.text)

    def text_files(self) -> list[str]:
        """The files of ``--text``: itself, or the ``.txt`` files of the directory by name (``[]``: the default
        text)."""
        if not self.args.text:
            return []
        if not self.is_directory():
            return [self.args.text]
        files = sorted(os.path.join(self.args.text, name) for name in os.listdir(self.args.text)
                       if name.endswith(".txt") and os.path.isfile(os.path.join(self.args.text, name)))
        if not files:
            raise EvalError(f"--text: no .txt files in the directory {self.args.text}")
        return files

    def books(self, tokenizer) -> list[tuple[str, array]]:
        """``(name, token ids)`` of every text, tokenized on the first call only (into int32 arrays: a PG-19 split
        is millions of tokens, too many for lists of Python ints)."""
        if self._books is None:
            books = [] if self.args.text else [("essays.txt", self._tokenize(tokenizer, essay_text()))]
            for path in self.text_files():
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except UnicodeDecodeError as err:
                    raise EvalError(f"--text: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
                except OSError as err:
                    raise EvalError(f"--text: cannot read {path}: {err.strerror}") from err
                books.append((os.path.basename(path), self._tokenize(tokenizer, text)))
            self._books = books
        return self._books

    @staticmethod
    def _tokenize(tokenizer, text: str) -> array:
        return array("i", tokenizer(text, verbose=False)["input_ids"])   # verbose: no warning about long inputs

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        num_samples = num_samples or self.default_samples
        books = self.books(tokenizer)
        directory = self.is_directory()
        decode = self.args.decode_tokens
        source = self.args.text or "the default text"
        samples = []
        for length in lengths:
            if decode + 1 >= length:
                raise EvalError(f"--decode-tokens {decode} must be smaller than --lengths {length} minus 1")
            eligible = [book for book in books if len(book[1]) >= length]
            if not eligible:
                name, longest = max(books, key=lambda book: len(book[1]))
                has = f"the longest book in {source}, {name}, has" if directory else f"{source} has"
                raise EvalError(f"ppl: --lengths {length} needs {length} tokens of text but {has} {len(longest)}; "
                                "pass a longer --text FILE|DIR or smaller --lengths")
            if len(eligible) < len(books):
                self.notes.append(f"ppl: --lengths {length}: {len(books) - len(eligible)} of {len(books)} books in "
                                  f"{source} are shorter and skipped")
            rng_for(seed, "ppl", length).shuffle(eligible)   # the books' order for this length
            for index in range(num_samples):
                rng = rng_for(seed, "ppl", length, index)
                name, tokens = eligible[index % len(eligible)]
                start = 0 if index == 0 and not directory else rng.randint(0, len(tokens) - length)
                samples.append(Sample(
                    id=f"ppl/L{length}/s{index}", task=self.name, length=length,
                    input_ids=tokens[start:start + length].tolist(), answers=[], max_new_tokens=decode + 1,
                    metric="perplexity", group="ppl",
                    meta={"book": name, "offset": start, "prefill_tokens": length - decode - 1,
                          "scored_tokens": decode}))
        return samples

    def evaluate(self, model, tokenizer, sample: Sample) -> dict:
        nll = forced_decode_nll(model, sample.input_ids, sample.meta["prefill_tokens"])
        total = sum(nll)
        return {"prediction": "", "score": math.exp(total / len(nll)), "nll_sum": total,
                "scored_tokens": len(nll), "generated_tokens": len(nll) + 1}

    def aggregate(self, records: Sequence[dict]) -> float:
        """Perplexity over all scored tokens of the records: exp(sum of NLL / number of tokens)."""
        tokens = sum(r["scored_tokens"] for r in records)
        return math.exp(sum(r["nll_sum"] for r in records) / tokens) if tokens else float("nan")
