"""The interface every harness implements; the runner and the CLI only talk to this."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import metrics
from ..common import PromptEncoder, Sample


class Task:
    """One ``twilight eval <name>`` harness.

    A task turns arguments into a deterministic list of :class:`Sample` (``build_samples``)
    and scores one sample on a (possibly patched) model (``evaluate``). Everything else --
    configs, resume, sharding, reports -- is the runner's job.

    To add a task: subclass, set the class attributes, implement ``build_samples`` (and
    ``add_arguments`` for extra flags), then register the class in ``tasks/__init__.py``.
    """

    name: str = ""
    help: str = ""
    default_lengths: tuple[int, ...] = (2048, 4096)
    default_samples: int = 1
    higher_is_better: bool = True
    generates: bool = True           # greedy generation (False: forced decoding, e.g. ppl)
    score_name: str = "score (%)"   # what the table's numbers are
    average_over_groups: bool = True  # the average row: mean of the groups' scores (False: of every sample)
    buckets_title: str = "By length bucket"  # the summary's table of meta["bucket"] scores, when samples have one

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.notes: list[str] = []   # messages for the user and the summary (skipped sub-tasks...)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the task's own flags to its sub-parser."""

    def check_arguments(self) -> None:
        """Validate the task's own flags before any model is loaded; raise ``EvalError``."""

    def metric_names(self) -> list[str]:
        """The metrics this run will score with (their dependencies are checked before the model loads)."""
        return []

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring one sample

    def postprocess(self, sample: Sample, text: str) -> str:
        """Clean the decoded generation before scoring."""
        return text.strip()

    def extra_eos_ids(self, sample: Sample, tokenizer) -> list[int]:
        """Extra token ids that end generation (besides end of turn); at least one token is generated."""
        return []

    def evaluate(self, model, tokenizer, sample: Sample) -> dict:
        """Greedy-decode ``sample`` under its protocol (``Sample.question_start``) and score it; returns the fields
        of the result record."""
        from ..modeling import generate_sample

        out = generate_sample(model, tokenizer, sample.input_ids, sample.question_start, sample.max_new_tokens,
                              extra_eos_ids=self.extra_eos_ids(sample, tokenizer))
        return self.score_generation(sample, out)

    def evaluate_prefilled(self, model, tokenizer, sample: Sample, pre) -> dict:
        """``evaluate`` from ``pre`` (``modeling.Prefill`` of ``sample.prefill_ids``, its cache forked for the config
        ``model`` is patched with): the same result without running the context again (``generates`` tasks). The
        question tokens, if any, are decoded here, under this config."""
        from ..modeling import continue_greedy, generate_question

        eos = self.extra_eos_ids(sample, tokenizer)
        if sample.question_start is None:
            out = continue_greedy(model, tokenizer, pre, sample.max_new_tokens, extra_eos_ids=eos)
        else:
            out = generate_question(model, tokenizer, pre, sample.input_ids, sample.max_new_tokens, extra_eos_ids=eos)
        return self.score_generation(sample, out)

    def score_generation(self, sample: Sample, out) -> dict:
        prediction = self.postprocess(sample, out.text)
        value = metrics.score(sample.metric, prediction, sample.answers, **sample.meta)
        return {"prediction": prediction, "score": value, "generated_tokens": out.num_tokens}

    # ------------------------------------------------------------------ aggregation

    def aggregate(self, records: Sequence[dict]) -> float:
        """One number for a group of records (default: mean score in percent)."""
        return 100.0 * sum(r["score"] for r in records) / len(records) if records else float("nan")
