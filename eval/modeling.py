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


def _eos_ids(model, tokenizer) -> list[int]:
    eos: list[int] = []
    for cand in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for t in cand if isinstance(cand, (list, tuple)) else [cand]:
            if isinstance(t, int) and t not in eos:
                eos.append(t)
    return eos


def _greedy_kwargs(tokenizer) -> dict:
    return dict(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id)


def generate_greedy(model, tokenizer, input_ids: list[int], max_new_tokens: int,
                    extra_eos_ids: list[int] | None = None, cache=None) -> Generation:
    """Greedy decoding of one prompt; stops at the end-of-turn token or ``extra_eos_ids``.

    Args:
        input_ids: the prompt, ``[T]`` token ids.
        max_new_tokens: generation budget.
        extra_eos_ids: more tokens that end generation (e.g. the newline), never as the first token.
        cache: a ``TwilightCache`` already holding the first ``T - 1`` prompt tokens (``generate()`` then runs the
            last one as a decode step); ``None``: a fresh cache, the prompt is prefilled.
    Returns:
        the decoded continuation (special tokens skipped) and its token ids.
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)  # [1, T]
    eos = _eos_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, **_greedy_kwargs(tokenizer))
    if extra_eos_ids:
        eos += [t for t in extra_eos_ids if t not in eos]
        kwargs["min_new_tokens"] = 1
    kwargs["eos_token_id"] = eos or None
    if cache is not None:
        from twilight.integrations.hf import compat
        kwargs[compat.cache_parameter(type(model).forward, type(model).__name__)] = cache
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new)


#: Generation settings that change a greedy first token, with their neutral values: ``continue_greedy`` takes the
#: first token as the argmax of the prefill's logits, which equals ``generate()``'s only when all are neutral.
_GREEDY_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                   "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                   "sequence_bias": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                   "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
                   "watermarking_config": (None,)}


def prefill_sharing_blocker(model) -> str | None:
    """Why decoding from a shared prefill would not reproduce ``generate_greedy`` on ``model`` (``None``: it does):
    the model's generation config sets a logits processor that acts on the first generated token."""
    gc = getattr(model, "generation_config", None)
    found = [f"{k}={getattr(gc, k)!r}" for k, neutral in _GREEDY_NEUTRAL.items()
             if getattr(gc, k, None) not in neutral]
    return ", ".join(found) or None


@dataclass
class Prefill:
    """A prompt run once through a patched model: its ``TwilightCache`` and the logits of its last token."""
    input_ids: list[int]
    cache: object
    last_logits: object  # [vocab] float
    seconds: float = 0.0  # how long the prefill took


def prefill(model, input_ids: list[int], configs=()) -> Prefill:
    """Run ``input_ids`` through the patched ``model`` into a fresh ``TwilightCache`` (dense, as generate's
    prefill). Selectors that watch the prompt record what they need: the patched config's, and those of
    ``configs`` (``TwilightConfig``s that will decode from a fork of this cache; one observer per distinct
    ``twilight.select.observation_key``)."""
    import torch

    from twilight.integrations.hf import compat, make_cache

    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    cache = make_cache(model, observe_for=configs)
    name = compat.cache_parameter(type(model).forward, type(model).__name__)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                    **{name: cache})
    return Prefill(list(input_ids), cache, out.logits[0, -1].float())


def decode_tokens(model, pre: Prefill, tokens: list[int]) -> Prefill:
    """Append ``tokens`` to a prefilled prompt one decode step each (the ``decode-question`` protocol).

    Each token is a single-token forward through ``pre.cache``, so a patched model attends over the prompt with
    its sparse decode path for every one of them, exactly as for a generated token. (Twilight's pipeline decodes
    single-token queries; a multi-token forward would be a dense prefill.)

    Args:
        pre: the prefilled context; its cache is extended in place (and returned in the result).
        tokens: the prompt tokens after the context (question, template tail, answer prefix).
    Returns:
        ``Prefill`` of ``pre.input_ids + tokens`` whose ``last_logits`` come from the last decode step
        (``pre`` itself when ``tokens`` is empty).
    """
    import torch

    from twilight.integrations.hf import compat

    if not tokens:
        return pre
    device = next(model.parameters()).device
    name = compat.cache_parameter(type(model).forward, type(model).__name__)
    ids = list(pre.input_ids)
    with torch.inference_mode():
        for token in tokens:
            ids.append(int(token))
            out = model(input_ids=torch.tensor([[token]], dtype=torch.long, device=device),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                        use_cache=True, logits_to_keep=1, **{name: pre.cache})
    return Prefill(ids, pre.cache, out.logits[0, -1].float(), pre.seconds)


def generate_sample(model, tokenizer, input_ids: list[int], question_start: int | None, max_new_tokens: int,
                    extra_eos_ids: list[int] | None = None) -> Generation:
    """Greedy decoding of one prompt under its protocol: ``generate_greedy`` when ``question_start`` is ``None``
    (``dense-prefill``); else the context ``input_ids[:question_start]`` is prefilled and every later prompt token
    goes through a decode step (``decode-question``: ``generate_question``)."""
    if question_start is None:
        return generate_greedy(model, tokenizer, input_ids, max_new_tokens, extra_eos_ids)
    return generate_question(model, tokenizer, prefill(model, input_ids[:question_start]), input_ids,
                             max_new_tokens, extra_eos_ids)


def generate_question(model, tokenizer, pre: Prefill, input_ids: list[int], max_new_tokens: int,
                      extra_eos_ids: list[int] | None = None) -> Generation:
    """The ``decode-question`` protocol from a prefilled context: the prompt tokens after ``pre`` go through decode
    steps one by one, the last of them as ``generate()``'s first step, so its logits processors act on the first
    answer token as in ``generate_greedy``.

    Args:
        pre: a prefill of a proper prefix of ``input_ids`` for the config ``model`` is patched with (consumed).
        input_ids: the whole prompt.
    """
    if not 0 < len(pre.input_ids) < len(input_ids) or list(input_ids[:len(pre.input_ids)]) != pre.input_ids:
        raise ValueError(f"generate_question: the prefill ({len(pre.input_ids)} tokens) must be a proper prefix of "
                         f"the prompt ({len(input_ids)} tokens)")
    pre = decode_tokens(model, pre, list(input_ids[len(pre.input_ids):-1]))
    return generate_greedy(model, tokenizer, input_ids, max_new_tokens, extra_eos_ids, cache=pre.cache)


def continue_greedy(model, tokenizer, pre: Prefill, max_new_tokens: int,
                    extra_eos_ids: list[int] | None = None) -> Generation:
    """``generate_greedy`` from a prefilled prompt: the same tokens, without running the prompt again.

    ``pre.cache`` must be a cache for the config ``model`` is patched with now (``fork_cache``); it is consumed.
    The first token is the argmax of the prefill's logits (end-of-turn tokens excluded when ``extra_eos_ids`` are
    given, as ``min_new_tokens=1`` does); ``generate()`` continues from there.
    """
    import torch

    from twilight.integrations.hf import compat

    eos = _eos_ids(model, tokenizer)
    stops = eos + [t for t in extra_eos_ids or [] if t not in eos]
    logits = pre.last_logits.clone()
    if extra_eos_ids and eos:
        logits[eos] = float("-inf")
    first = int(logits.argmax())
    if first in stops or max_new_tokens <= 1:
        return Generation(tokenizer.decode([first], skip_special_tokens=True), [first])
    device = next(model.parameters()).device
    ids = torch.tensor([pre.input_ids + [first]], dtype=torch.long, device=device)
    name = compat.cache_parameter(type(model).forward, type(model).__name__)
    kwargs = dict(max_new_tokens=max_new_tokens - 1, eos_token_id=stops or None, **_greedy_kwargs(tokenizer))
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{name: pre.cache}, **kwargs)
    new = out[0, len(pre.input_ids):].tolist()
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new)
