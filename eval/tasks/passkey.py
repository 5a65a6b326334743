"""Passkey retrieval: a 5-digit key hidden at a chosen depth in repeated filler text.

The classic long-context probe (Mohtashami & Jaggi, 2023): filler sentences, one needle
("The pass key is 71432. Remember it. 71432 is the pass key.") placed after a fraction
``depth`` of the filler, then the question. The grid is ``--depths`` x ``--lengths`` with
``--samples`` different keys per cell. Scored by whether the key appears in the answer.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from twilight.models import (
    PASSKEY_ANSWER_PREFIX,
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
)

from ..common import EvalError, PromptEncoder, Sample, fit_largest, rng_for
from .base import Task

MAX_NEW_TOKENS = 16
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)


def _percent(value: str) -> int:
    try:
        depth = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer percentage 0-100, got {value!r}") from None
    if not 0 <= depth <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {depth}")
    return depth


def build_passkey_text(num_filler: int, depth: int, key: str) -> tuple[str, str]:
    """The user text with ``num_filler`` filler lines and the needle after ``depth``% of them.

    Returns ``(text, needle)``.
    """
    before = round(num_filler * depth / 100)
    lines = [PASSKEY_FILLER] * num_filler
    needle = PASSKEY_NEEDLE.format(key=key)
    lines.insert(before, needle)
    return f"{PASSKEY_INTRO}\n\n" + "\n".join(lines) + f"\n\n{PASSKEY_QUESTION}", needle


def locate(encoder: PromptEncoder, prompt: str, context: str, needle: str) -> dict:
    """Token positions of the haystack and of the needle inside the final prompt."""
    ctx_start_char = prompt.index(context)
    ctx_start = encoder.char_to_token(prompt, ctx_start_char)
    ctx_end = encoder.char_to_token(prompt, ctx_start_char + len(context))
    needle_token = encoder.char_to_token(prompt, prompt.index(needle))
    haystack_tokens = max(ctx_end - ctx_start - encoder.token_count(needle), 1)   # needle excluded
    return {"context_start": ctx_start, "context_end": ctx_end, "context_tokens": ctx_end - ctx_start,
            "needle_token": needle_token, "token_depth": round((needle_token - ctx_start) / haystack_tokens, 4)}


class PasskeyTask(Task):
    name = "passkey"
    help = "passkey retrieval over a needle depth x context length grid"
    default_lengths = (1024, 2048, 4096)
    default_samples = 1
    score_name = "accuracy (%)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--depths", type=_percent, nargs="+", default=list(DEFAULT_DEPTHS),
                            metavar="PCT", help="needle depths in percent of the filler "
                                                f"(default: {' '.join(map(str, DEFAULT_DEPTHS))})")

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        num_samples = num_samples or self.default_samples
        samples = []
        for length in lengths:
            budget = length - MAX_NEW_TOKENS
            for depth in dict.fromkeys(self.args.depths):
                for index in range(num_samples):
                    rng = rng_for(seed, self.name, length, depth, index)
                    key = str(rng.randint(10000, 99999))

                    def prompt_len(n: int, depth: int = depth, key: str = key) -> int:
                        text, _ = build_passkey_text(n, depth, key)
                        return len(encoder.encode(encoder.render(text, PASSKEY_ANSWER_PREFIX)))

                    n = fit_largest(prompt_len, budget, 0, f"passkey: --lengths {length}")
                    text, needle = build_passkey_text(n, depth, key)
                    prompt = encoder.render(text, PASSKEY_ANSWER_PREFIX)
                    ids = encoder.encode(prompt)
                    context = text[len(PASSKEY_INTRO) + 2:-(len(PASSKEY_QUESTION) + 2)]
                    meta = {"depth": depth, "key": key, "filler_lines": n, **locate(encoder, prompt, context, needle)}
                    samples.append(Sample(
                        id=f"passkey/L{length}/d{depth}/s{index}", task=self.name, length=length,
                        input_ids=ids, answers=[key], max_new_tokens=MAX_NEW_TOKENS,
                        metric="string_match_all", group=f"depth {depth}%", meta=meta,
                        question_start=meta["context_end"]))
        if not samples:
            raise EvalError("passkey: no samples to evaluate")
        return samples
