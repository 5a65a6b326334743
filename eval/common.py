"""Pieces shared by every harness: the sample record, prompt encoding and length fitting.

Lengths are always counted in the evaluated model's own tokens, after the chat template
(when one is used) and including the tokens the model is allowed to generate: a sample
built for length ``L`` satisfies ``len(input_ids) + max_new_tokens <= L``, as in RULER.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any


class EvalError(Exception):
    """A user-facing error (bad argument, unreachable data); the CLI prints it on one line, exit 2."""


@dataclass
class Sample:
    """One prompt to evaluate, identical for every configuration compared.

    Attributes:
        id: unique within a run, e.g. ``"niah_single_1/L4096/s0"``; part of the resume key with the config, the
            fingerprint and the run key (``runner.record_key``).
        task: sub-task name (``"niah_single_1"``, ``"narrativeqa"``, ``"passkey"``, ``"ppl"``).
        length: the target length in tokens (prompt + generation budget <= length).
        input_ids: the full prompt, chat template included, as token ids.
        answers: reference answers (empty for perplexity).
        max_new_tokens: greedy generation budget.
        metric: a name in :data:`twilight_eval.metrics.METRICS` (tasks that score themselves, like
            ppl, may use their own).
        group: the row label in the results table (defaults to ``task``).
        meta: everything else worth recording (needle depth and token offsets, context tokens...).
        question_start: index in ``input_ids`` of the first token after the context (the question, the rest of
            the template, the answer prefix). Under the ``decode-question`` protocol (``--protocol``, as Quest and
            Twilight evaluated LongBench and RULER) the prompt is prefilled up to here and the remaining tokens go
            through decode steps one by one, so sparse attention reads the question too. ``None``: the whole
            prompt is prefilled (``dense-prefill``, or a task without a context/question split).
    """

    id: str
    task: str
    length: int
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    metric: str
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    question_start: int | None = None

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.task
        if self.question_start is not None and not 1 <= self.question_start < len(self.input_ids):
            raise ValueError(f"sample {self.id}: question_start {self.question_start} outside [1, "
                             f"{len(self.input_ids) - 1}] (context and question need a token each)")

    @property
    def protocol(self) -> str:
        """``"decode-question"`` when the tokens from ``question_start`` on are decoded one by one, else
        ``"dense-prefill"``."""
        return "dense-prefill" if self.question_start is None else "decode-question"

    @property
    def prefill_ids(self) -> list[int]:
        """The tokens prefilled in one forward: the whole prompt, or the context under ``decode-question``."""
        return self.input_ids if self.question_start is None else self.input_ids[:self.question_start]

    @property
    def question_tokens(self) -> int:
        """Prompt tokens that go through decode steps (0 under ``dense-prefill``)."""
        return 0 if self.question_start is None else len(self.input_ids) - self.question_start

    @property
    def input_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def fingerprint(self) -> str:
        """Hash of what the model sees and is scored against; a changed sample is never resumed."""
        parts: list = [self.input_ids, self.answers, self.max_new_tokens, self.metric]
        if self.question_start is not None:   # dense-prefill keeps the fingerprints of runs before --protocol
            parts.append({"question_start": self.question_start})
        payload = json.dumps(parts)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def rng_for(seed: int, *keys: object) -> random.Random:
    """A ``random.Random`` that depends only on ``seed`` and ``keys`` (stable across processes)."""
    return random.Random("/".join([str(seed), *map(str, keys)]))


# --------------------------------------------------------------------------- shipped data

def data_text(name: str) -> str:
    """Read a text file shipped in ``twilight_eval/data``."""
    return resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def essay_text() -> str:
    """Original essays shipped with the package (~5,150 words): the start of RULER's essay haystack (generated
    prose continues it, see :mod:`twilight_eval.haystack`) and the default ppl text."""
    return data_text("essays.txt")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``.``, ``!`` or ``?`` followed by whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# --------------------------------------------------------------------------- prompts

class PromptEncoder:
    """Turns a task's text into the model's input ids, with or without the chat template.

    With the chat template the task text is the user turn and ``answer_prefix`` starts the
    assistant turn (as RULER does for chat models); without it they are concatenated.

    Example:
        >>> enc = PromptEncoder(tokenizer, chat=True)
        >>> text = enc.render("What is 2+2?", "The answer is")
        >>> ids = enc.encode(text)
    """

    def __init__(self, tokenizer, chat: bool | str = "auto"):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat == "auto":
            chat = has_template
        elif chat in ("on", True) and not has_template:
            raise EvalError("--chat on: the tokenizer has no chat template")
        self.chat = bool(chat) and chat != "off"

    def render(self, user_text: str, answer_prefix: str = "", chat: bool | None = None) -> str:
        """The full prompt as text."""
        if self.chat if chat is None else chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True)
            return text + answer_prefix.lstrip()
        return user_text + answer_prefix

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of a rendered prompt (special tokens added only when no chat template is used)."""
        use_chat = self.chat if chat is None else chat
        ids = self.tokenizer(text, add_special_tokens=not use_chat)["input_ids"]
        return list(ids)

    def char_to_token(self, text: str, char_index: int, chat: bool | None = None) -> int:
        """Index of the token of ``encode(text)`` that covers character ``char_index``."""
        use_chat = self.chat if chat is None else chat
        try:
            enc = self.tokenizer(text, add_special_tokens=not use_chat, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers
            return len(self.encode(text[:char_index], chat=use_chat))
        for i, (start, end) in enumerate(offsets):
            if end > char_index and end > start:
                return i
        return len(offsets)

    def token_count(self, text: str) -> int:
        """Tokens of a bare piece of text, without special tokens."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_largest(build_len: Callable[[int], int], budget: int, lo: int, what: str,
                hi: int | None = None) -> int:
    """Largest ``n >= lo`` (and ``<= hi`` if given) with ``build_len(n) <= budget``.

    ``build_len`` must be (close to) non-decreasing; the returned ``n`` was probed and fits.
    Doubles from ``lo`` until the budget is exceeded, then bisects, so probes stay within
    twice the answer. Raises :class:`EvalError` naming ``what`` when even ``lo`` does not fit.
    """
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = build_len(n)
        return cache[n] <= budget

    if not fits(lo):
        raise EvalError(f"{what} is too short: the smallest prompt needs {cache[lo]} tokens "
                        f"but only {budget} are available")
    good, n = lo, max(2 * lo, lo + 16)
    while True:
        if hi is not None and n >= hi:
            if fits(hi):
                return hi
            bad = hi
            break
        if not fits(n):
            bad = n
            break
        good, n = n, 2 * n
    while bad - good > 1:   # invariant: fits(good) and not fits(bad)
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


# --------------------------------------------------------------------------- the hub

def offline_mode() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline (use their caches only)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers; ``(False, reason)`` when offline."""
    if offline_mode():
        return False, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    hostname, _, port = host.partition(":")
    try:
        socket.create_connection((hostname, int(port or 443)), timeout=timeout).close()
        return True, ""
    except OSError as err:
        return False, f"{hostname} unreachable ({err})"


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number
