"""``copy.deepcopy`` and pickle (``torch.save`` of the whole model) of a model patched by ``twilight.patch``.

The copy is patched on its own: its attention reads its own weights, it keeps its own pipeline, stats and
engagement counters, and ``twilight.unpatch`` on either model leaves the other patched. Every check compares
against an independent reference: a freshly built model given the same weights, patched (or not) from scratch.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import twilight
from twilight.integrations import hf

# Small enough to prune on ~60 tokens (layer 0 dense): Twilight's decode differs from dense attention.
TOP_P = {"selector": {"type": "full"}, "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85},
         "dense_layers": [0]}
NEW_TOKENS = 6


def tiny_llama(state_dict=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always generate the requested number of tokens
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def patched_reference(model, spec=TOP_P):
    """A model built from scratch with ``model``'s weights, patched with ``spec``: what a copy must match."""
    return twilight.patch(tiny_llama(model.state_dict()), spec)


def prompt():
    return torch.randint(3, 1000, (1, 60), generator=torch.Generator().manual_seed(1))


def run(model, ids):
    """Greedy tokens and the raw logits of every generated position."""
    out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def perturb(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_unpatched(model):
    assert not hf.is_patched(model)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.get_decoder().__dict__
    assert "_prepare_cache_for_generation" not in model.__dict__ and "generate" not in model.__dict__


def decode_steps(model):
    return twilight.budget_stats(model).as_dict()["decode_steps"]


def skip_unless_models_pickle():
    """Skip where this transformers release cannot pickle even an unpatched model (5.0.0 with the optional
    ``kernels`` package installed: its hub functions are local classes), which no patch can change."""
    try:
        torch.save(tiny_llama(), io.BytesIO())
    except (AttributeError, TypeError, pickle.PicklingError) as err:
        pytest.skip(f"this transformers release cannot pickle an unpatched model either: {err}")


def torch_round_trip(model):
    skip_unless_models_pickle()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "torch.save": torch_round_trip}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("used", [False, True], ids=["fresh", "after-generate"])
def test_copy_of_a_patched_model_runs_its_own_weights(how, used):
    ids = prompt()
    original = twilight.patch(tiny_llama(), TOP_P)
    expected = run(patched_reference(original), ids)
    if used:  # its pipeline has built backends and selectors, its stats and counters are non-zero
        assert_same(run(original, ids), expected)
    counts = hf.engagement(original)

    clone = COPIES[how](original)
    assert hf.is_patched(clone) and clone.config._attn_implementation == "twilight_sdpa"
    assert hf.engagement(clone) == counts  # a copy of the state at the time of copying
    assert twilight.budget_stats(clone) is not twilight.budget_stats(original)
    assert_same(run(clone, ids), expected)  # same weights: same output as the original

    perturb(clone)
    perturbed = run(clone, ids)
    assert not torch.equal(perturbed[1], expected[1])  # the copy's own (perturbed) weights, not the original's
    assert_same(perturbed, run(patched_reference(clone), ids))  # exactly what patching those weights gives
    assert twilight.budget_stats(clone).as_dict()["attended_fraction"] < 1.0  # Twilight really pruned on it
    assert_same(run(original, ids), expected)  # the original is unchanged

    # each model counts its own decode steps, all of them through Twilight: the copy's 2 runs after the `used`
    # one it copied the counts of, the original's `used` + 1
    steps = NEW_TOKENS - 1
    copy_counts, original_counts = hf.engagement(clone), hf.engagement(original)
    assert copy_counts["decode_forwards"] == copy_counts["twilight_forwards"] == (used + 2) * steps
    assert original_counts["decode_forwards"] == original_counts["twilight_forwards"] == (used + 1) * steps
    assert decode_steps(clone) == copy_counts["twilight_forwards"]
    assert decode_steps(original) == original_counts["twilight_forwards"]

    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    assert torch.count_nonzero(clone(input_ids=ids).logits) == 0  # a zeroed lm_head gives zero logits
    assert torch.count_nonzero(original(input_ids=ids).logits) > 0
    assert_same(run(original, ids), expected)


@pytest.mark.parametrize("how", COPIES)
def test_unpatch_of_a_copy_leaves_the_original_patched_and_vice_versa(how):
    ids = prompt()
    original = twilight.patch(tiny_llama(), TOP_P)
    sparse = run(original, ids)
    dense = run(tiny_llama(), ids)  # the same weights, never patched
    assert not torch.equal(sparse[1], dense[1])  # the sparse config changes the logits: the checks below tell

    clone = COPIES[how](original)
    assert twilight.unpatch(clone) is clone
    assert_unpatched(clone)
    assert_same(run(clone, ids), dense)
    assert hf.is_patched(original) and original.config._attn_implementation == "twilight_sdpa"
    before = hf.engagement(original)["twilight_forwards"]
    assert_same(run(original, ids), sparse)
    assert hf.engagement(original)["twilight_forwards"] == before + NEW_TOKENS - 1

    clone = COPIES[how](original)
    twilight.unpatch(original)
    assert_unpatched(original)
    assert_same(run(original, ids), dense)
    assert hf.is_patched(clone)
    assert_same(run(clone, ids), sparse)
    twilight.patch(clone, "dense")  # re-patching the copy replaces its config, as on any patched model
    assert_same(run(clone, ids), run(patched_reference(clone, "dense"), ids))
    assert torch.equal(run(clone, ids)[0], dense[0])
    twilight.unpatch(clone)
    assert_unpatched(clone)
    assert_same(run(clone, ids), dense)


def test_unpickled_model_registers_its_attention_implementation(monkeypatch):
    """A patched model loaded in a process that never called ``twilight.patch``: the ``twilight_sdpa``
    attention implementation it names is registered again when it is unpickled."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    skip_unless_models_pickle()
    ids = prompt()
    original = twilight.patch(tiny_llama(), TOP_P)
    expected = run(original, ids)
    buffer = io.BytesIO()
    torch.save(original, buffer)
    monkeypatch.delitem(AttentionInterface._global_mapping, "twilight_sdpa")
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, "twilight_sdpa")
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "twilight_sdpa" in AttentionInterface._global_mapping
    assert "twilight_sdpa" in AttentionMaskInterface._global_mapping
    assert_same(run(loaded, ids), expected)
    assert hf.engagement(loaded)["twilight_forwards"] == 2 * (NEW_TOKENS - 1)


@pytest.mark.parametrize("how", COPIES)
def test_copy_keeps_the_pipeline_settings_and_stats_in_a_pipeline_of_its_own(how):
    original = twilight.patch(tiny_llama(), TOP_P)
    run(original, prompt())
    pipeline = hf.make_cache(original).pipeline
    pipeline.host_reads = False  # a setting of the original's pipeline
    clone = COPIES[how](original)
    copied = hf.make_cache(clone).pipeline
    assert copied is not pipeline and copied.config == pipeline.config and copied.host_reads is False
    assert twilight.budget_stats(clone).as_dict() == twilight.budget_stats(original).as_dict()
    twilight.budget_stats(clone).reset()
    assert decode_steps(clone) == 0 and decode_steps(original) == NEW_TOKENS - 1
