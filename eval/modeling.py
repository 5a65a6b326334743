"""Loading the model under evaluation and greedy decoding.

``--model`` is the embedded default (``twilight.DEFAULT_MODEL_ID``, loaded offline by
``twilight.load_default_model``), a Hugging Face id or local directory, or a local ``.gguf``
file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .common import EvalError

FALLBACK_DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_model_id() -> str:
    """The string ``--model`` defaults to; selecting it loads the embedded model."""
    try:
        import twilight
        return getattr(twilight, "DEFAULT_MODEL_ID", FALLBACK_DEFAULT_MODEL_ID)
    except ImportError:
        return FALLBACK_DEFAULT_MODEL_ID


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    import torch
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(spec: str, dtype: str = "auto", device: str = "auto"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if spec == default_model_id():
        import twilight
        model, tokenizer = twilight.load_default_model(dtype=torch_dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        kwargs = {}
        path = spec
        if spec.endswith(".gguf") and os.path.isfile(spec):
            path, kwargs["gguf_file"] = os.path.split(os.path.abspath(spec))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EvalError(f"--model: cannot load {spec!r}: {first_line}") from err
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def max_context(model) -> int | None:
    """The longest sequence the model supports (``max_position_embeddings``), if known."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if value else None


@dataclass
class Generation:
    text: str
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def generate_greedy(model, tokenizer, input_ids: list[int], max_new_tokens: int,
                    extra_eos_ids: list[int] | None = None) -> Generation:
    """Greedy decoding of one prompt; stops at the end-of-turn token or ``extra_eos_ids``.

    Args:
        input_ids: the prompt, ``[T]`` token ids.
        max_new_tokens: generation budget.
        extra_eos_ids: more tokens that end generation (e.g. the newline), never as the first token.
    Returns:
        the decoded continuation (special tokens skipped) and its token ids.
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)  # [1, T]
    eos: list[int] = []
    for cand in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for t in cand if isinstance(cand, (list, tuple)) else [cand]:
            if isinstance(t, int) and t not in eos:
                eos.append(t)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                  temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    if extra_eos_ids:
        eos += [t for t in extra_eos_ids if t not in eos]
        kwargs["min_new_tokens"] = 1
    kwargs["eos_token_id"] = eos or None
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new)
