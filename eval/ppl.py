"""Perplexity of a long text, where every scored token is predicted by a decode step.

Sparse attention only acts on decode steps (prefill stays dense), so a plain teacher-forced
forward pass would never exercise it. Instead, for a window of ``L`` tokens the first
``L - D - 1`` are prefilled, then ``model.generate`` is forced to emit the true next tokens
one by one; the logits of the ``D`` decode steps score the last ``D`` tokens of the window
(``--decode-tokens``). The text is ``--text`` or the package's own essays (about 6k tokens
with the embedded model's tokenizer).
"""
from __future__ import annotations

import argparse
import math
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
    help = "perplexity of a long text; every scored token is produced by a (sparse) decode step"
    default_lengths = (1024, 2048, 4096)
    default_samples = 1
    higher_is_better = False
    generates = False
    score_name = "perplexity"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--text", metavar="PATH",
                            help="UTF-8 text file to score (default: the essays shipped with the package)")
        parser.add_argument("--decode-tokens", type=positive_int, default=DEFAULT_DECODE_TOKENS, metavar="N",
                            help=f"tokens scored at the end of each window, one decode step each "
                                 f"(default: {DEFAULT_DECODE_TOKENS})")

    def check_arguments(self) -> None:
        if self.args.text:
            try:
                with open(self.args.text, encoding="utf-8") as f:
                    f.read(1)
            except OSError as err:
                raise EvalError(f"--text: cannot read {self.args.text}: {err.strerror}") from err

    def text(self) -> str:
        if self.args.text:
            with open(self.args.text, encoding="utf-8") as f:
                return f.read()
        return essay_text()

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        num_samples = num_samples or self.default_samples
        tokens = list(tokenizer(self.text())["input_ids"])
        decode = self.args.decode_tokens
        source = self.args.text or "the default text"
        samples = []
        for length in lengths:
            if length > len(tokens):
                raise EvalError(f"ppl: --lengths {length} needs {length} tokens of text but {source} has "
                                f"{len(tokens)}; pass a longer --text or smaller --lengths")
            if decode + 1 >= length:
                raise EvalError(f"--decode-tokens {decode} must be smaller than --lengths {length} minus 1")
            for index in range(num_samples):
                start = 0 if index == 0 else rng_for(seed, "ppl", length, index).randint(0, len(tokens) - length)
                window = tokens[start:start + length]
                samples.append(Sample(
                    id=f"ppl/L{length}/s{index}", task=self.name, length=length, input_ids=window,
                    answers=[], max_new_tokens=decode + 1, metric="perplexity", group="ppl",
                    meta={"offset": start, "prefill_tokens": length - decode - 1, "scored_tokens": decode}))
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
