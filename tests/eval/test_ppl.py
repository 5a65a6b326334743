"""Perplexity through forced decode steps equals teacher forcing on an unpatched model."""
import argparse
import math

import pytest
import torch

from twilight_eval.common import EvalError
from twilight_eval.ppl import PerplexityTask, forced_decode_nll


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_forced_decode_scores_the_same_tokens_as_teacher_forcing(tiny_model):
    ids = torch.randint(10, 5000, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    prefill = 30
    nll = forced_decode_nll(tiny_model, ids, prefill)
    assert len(nll) == len(ids) - prefill - 1             # token `prefill` comes from the prefill: not scored
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([ids])).logits[0].float()   # [T, V]
    logprobs = torch.log_softmax(logits, -1)
    expected = [-float(logprobs[t - 1, ids[t]]) for t in range(prefill + 1, len(ids))]
    assert nll == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_windows_and_aggregation(tokenizer, encoder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i}" for i in range(600)))
    task = PerplexityTask(argparse.Namespace(text=str(text), decode_tokens=16))
    task.check_arguments()
    samples = task.build_samples(tokenizer, encoder, [128, 256], 2, seed=0)
    assert [s.id for s in samples] == ["ppl/L128/s0", "ppl/L128/s1", "ppl/L256/s0", "ppl/L256/s1"]
    for s in samples:
        assert len(s.input_ids) == s.length and s.meta["prefill_tokens"] == s.length - 17
    assert samples[0].meta["offset"] == 0 and samples[1].meta["offset"] != 0
    # perplexity over all scored tokens, not the mean of per-sample perplexities:
    # exp((2 + 4) / (2 + 2)) = exp(1.5)
    records = [{"nll_sum": 2.0, "scored_tokens": 2}, {"nll_sum": 4.0, "scored_tokens": 2}]
    assert task.aggregate(records) == pytest.approx(math.exp(1.5))


def test_text_too_short_and_missing_file(tokenizer, encoder, tmp_path):
    task = PerplexityTask(argparse.Namespace(text=None, decode_tokens=16))
    with pytest.raises(EvalError, match=r"ppl: --lengths 100000 needs 100000 tokens of text but the default "
                                        r"text has \d+"):
        task.build_samples(tokenizer, encoder, [100000], 1, seed=0)
    with pytest.raises(EvalError, match=r"--decode-tokens 16 must be smaller"):
        task.build_samples(tokenizer, encoder, [16], 1, seed=0)
    with pytest.raises(EvalError, match="--text: cannot read"):
        PerplexityTask(argparse.Namespace(text=str(tmp_path / "none.txt"), decode_tokens=4)).check_arguments()


def test_the_shipped_text_is_long_enough_for_the_default_lengths(tokenizer):
    from twilight_eval.common import essay_text
    assert len(tokenizer(essay_text())["input_ids"]) > max(PerplexityTask.default_lengths)
