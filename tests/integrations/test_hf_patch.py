"""`twilight.patch` on tiny randomly initialised Llama, Mistral, Qwen2 and Qwen3 models (no download).

Each model has 4 layers, hidden size 64, 4 query / 2 kv heads (GQA) of dim 16 and a 1000-token vocabulary;
``initializer_range=0.1`` makes logits peaked enough that greedy decoding is not decided by float noise.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import twilight
from twilight.integrations import hf

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
# Sparse configs small enough to prune on contexts of ~100 tokens.
TOP_P = {"selector": {"type": "full"}, "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85},
         "dense_layers": [0]}
QUEST_TOP_P = {"selector": {"type": "quest", "token_budget": 32, "page_size": 16}, "estimator": {"type": "int4"},
               "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [0]}
STREAMING = {"selector": {"type": "streaming", "sink_tokens": 4, "window": 16}, "estimator": {"type": "exact"},
             "pruner": {"type": "none"}, "dense_layers": [0]}
# The selectors that build on the step plan and the prefill (budgets small enough to select on ~100 tokens).
NEW_SELECTORS = {"sparq": {"type": "sparq", "token_budget": 24, "num_channels": 4},
                 "tidal": {"type": "tidal", "token_budget": 24, "reselection_layers": [2]},
                 "snapkv": {"type": "snapkv", "token_budget": 24, "observation_window": 8},
                 "h2o": {"type": "h2o", "token_budget": 24, "recent_tokens": 8}}
PAD = 0
# The cache keywords this transformers release accepts: `past_key_values` up to 5.23; from 5.24 `cache`, with
# `past_key_values` still accepted (deprecated).
_FORWARD_PARAMS = inspect.signature(transformers.LlamaModel.forward).parameters
CACHE_KEYWORDS = ["past_key_values"] + (["cache"] if "cache" in _FORWARD_PARAMS else [])


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.1)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    model.generation_config.eos_token_id = None  # always generate the requested number of tokens
    return model


def prompts(lengths, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (1, n), generator=g) for n in lengths]


def left_pad(seqs):
    """``(input_ids, attention_mask)`` of a left-padded batch."""
    width = max(s.shape[1] for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[1]:] = s[0]
        mask[i, width - s.shape[1]:] = 1
    return ids, mask


def greedy(model, ids, mask=None, n=8, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                          **kwargs)


def assert_unpatched(model, attn="sdpa"):
    assert not hf.is_patched(model)
    assert model.config._attn_implementation == attn
    assert "forward" not in model.get_decoder().__dict__
    assert "_prepare_cache_for_generation" not in model.__dict__


# ---------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_preset_and_unpatch_give_identical_greedy_output(family):
    model = tiny_model(family)
    ids = torch.cat(prompts([90, 90]))
    ref = greedy(model, ids, n=12)
    assert twilight.patch(model, "dense") is model
    assert torch.equal(greedy(model, ids, n=12), ref)
    twilight.patch(model, TOP_P)
    sparse = greedy(model, ids, n=12)
    assert sparse.shape == ref.shape
    assert twilight.budget_stats(model).as_dict()["attended_fraction"] < 1.0  # it really pruned
    twilight.unpatch(model)
    assert_unpatched(model)
    assert torch.equal(greedy(model, ids, n=12), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["dense", "top_p", "streaming"])
def test_left_padded_batch_matches_per_sample_runs(family, preset):
    """Padding is never selected: a padded sequence decodes as it does alone (streaming's sinks would be
    padding otherwise; top-p over all candidates depends on the sequence only)."""
    spec = {"dense": "dense", "top_p": TOP_P, "streaming": STREAMING}[preset]
    model = tiny_model(family)
    seqs = prompts([100, 70, 37])
    ids, mask = left_pad(seqs)
    twilight.patch(model, spec)
    single = [greedy(model, s)[0, s.shape[1]:] for s in seqs]
    batch = greedy(model, ids, mask)[:, ids.shape[1]:]
    for b in range(len(seqs)):
        assert torch.equal(batch[b], single[b]), f"sequence {b} differs in the batch"


@pytest.mark.parametrize("selector", NEW_SELECTORS)
@pytest.mark.parametrize("top_p", [None, 0.85])
def test_new_selectors_patch_alone_and_with_top_p(selector, top_p):
    """sparq, tidal, snapkv and h2o through ``twilight.patch``, alone and pruned by top-p: every decode step goes
    through Twilight within the selector's budget, and a left-padded batch decodes as each sequence alone (padding
    is never selected, voted for or accumulated)."""
    pruner = {"type": "top_p", "p": top_p} if top_p else {"type": "none"}
    spec = {"selector": NEW_SELECTORS[selector], "estimator": {"type": "int4" if top_p else "exact"},
            "pruner": pruner, "dense_layers": [0], "dense_below": 0}
    model = tiny_model()
    seqs = prompts([100, 70, 45])
    ids, mask = left_pad(seqs)
    twilight.patch(model, spec)
    single = [greedy(model, s)[0, s.shape[1]:] for s in seqs]
    stats = twilight.budget_stats(model)
    stats.reset()
    batch = greedy(model, ids, mask)[:, ids.shape[1]:]
    for b in range(len(seqs)):
        assert torch.equal(batch[b], single[b]), f"sequence {b} differs in the batch"
    d = stats.as_dict()
    assert d["decode_steps"] == 7 * len(seqs) and d["attended_fraction"] < 1.0  # (step, sequence) pairs
    budget = 24 + (8 if selector == "snapkv" else 0)  # snapkv also attends every generated token
    sparse_layers = [3] if selector == "tidal" else [1, 2, 3]  # tidal's layer 1 precedes, 2 re-selects: full
    assert all(max(d["per_head"][i]) <= budget for i in sparse_layers)
    if top_p:  # the pruner keeps fewer than the selector's candidates
        assert sum(sum(d["per_head"][i]) / len(d["per_head"][i]) for i in sparse_layers) / len(sparse_layers) < 24


def test_fork_cache_copies_tokens_padding_and_observations():
    """A fork holds the same tokens, padding and prompt observations in its own storage, for the config the
    model is patched with now; decoding from it equals generating from scratch."""
    model = tiny_model()
    seqs = prompts([60, 41])
    ids, mask = left_pad(seqs)
    twilight.patch(model, {"selector": NEW_SELECTORS["h2o"], "estimator": {"type": "exact"},
                           "pruner": {"type": "none"}, "dense_layers": [0], "dense_below": 0})
    cache = hf.make_cache(model)
    name = hf.compat.cache_parameter(type(model).forward, "LlamaForCausalLM")
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
              **{name: cache})  # the positions generate() gives a left-padded batch
    fork = hf.fork_cache(model, cache)
    assert fork is not cache and fork.pipeline is hf.make_cache(model).pipeline
    assert torch.equal(fork.start, cache.start)
    for i in range(4):
        a, b = cache.layer_cache(i), fork.layer_cache(i)
        assert torch.equal(a.keys(), b.keys()) and a.keys().data_ptr() != b.keys().data_ptr()
        assert torch.equal(a.start, b.start)
        assert a.observations.keys() == b.observations.keys() == ({"h2o_scores", "h2o_length", "scale"} if i else set())
        if i:
            assert torch.equal(a.observations["h2o_scores"], b.observations["h2o_scores"])
            assert a.observations["h2o_scores"].data_ptr() != b.observations["h2o_scores"].data_ptr()
    ref = greedy(model, ids, mask)
    T = ids.shape[1]  # the fork holds the prompt: generate() runs only the tokens after it, as decode steps
    ids1, mask1 = ref[:, :T + 1], torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    with_fork = greedy(model, ids1, mask1, n=7, **{name: hf.fork_cache(model, cache)})
    assert torch.equal(with_fork, ref)
    with pytest.raises(TypeError, match="TwilightCache"):
        hf.fork_cache(model, DynamicCache())


def test_make_cache_observe_for_lets_other_configs_fork_one_prefill():
    """A cache prefilled under ``dense`` with ``observe_for=[snapkv config]`` holds the snapkv selector's
    observations, so that a fork decodes under snapkv exactly as a prefill patched with snapkv itself does; without
    it, the fork holds none and snapkv refuses to decode."""
    snapkv = {"selector": NEW_SELECTORS["snapkv"], "estimator": {"type": "exact"}, "pruner": {"type": "none"},
              "dense_layers": [0], "dense_below": 0}
    model = tiny_model()
    ids = prompts([60])[0]
    name = hf.compat.cache_parameter(type(model).forward, "LlamaForCausalLM")
    twilight.patch(model, snapkv)
    ref = greedy(model, ids)
    T = ids.shape[1]

    def prefill(observe_for):
        cache = hf.make_cache(model, observe_for=observe_for)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, **{name: cache})
        return cache

    twilight.patch(model, "dense")
    shared = prefill(["streaming", snapkv])  # streaming observes nothing: no observer for it
    assert len(shared.observers) == 1 and shared.observers[0].config.selector.type == "snapkv"
    bare = prefill(())
    assert not bare.observers and not bare.layer_cache(1).observations
    twilight.patch(model, snapkv)
    ids1 = ref[:, :T + 1]
    assert torch.equal(greedy(model, ids1, n=7, **{name: hf.fork_cache(model, shared)}), ref)
    with pytest.raises(ValueError, match="observ"):
        greedy(model, ids1, n=7, **{name: hf.fork_cache(model, bare)})


def test_quest_never_selects_padding():
    """Quest on a left-padded batch: decode-step selections stay inside each sequence's tokens."""
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([100, 57, 23]))
    twilight.patch(model, QUEST_TOP_P)
    with torch.no_grad():
        cache = hf.output_cache(model(input_ids=ids, attention_mask=mask))
    pipeline = cache.pipeline
    for layer in (1, 2, 3):
        lc = cache.layer_cache(layer)
        for _ in range(5):
            q = torch.randn(3, 4, 16) * 3
            for sel in (pipeline.select(layer, q, lc), pipeline.prune(q, lc, pipeline.select(layer, q, lc), 0.25)[0]):
                selected = sel.to_mask(lc.length)  # [B, Hkv, L]
                assert not selected[1, :, :43].any() and not selected[2, :, :77].any()
                assert (sel.counts >= 1).all()


def test_padding_becomes_each_sequences_start():
    model = tiny_model("qwen2")
    ids, mask = left_pad(prompts([50, 20, 45]))
    twilight.patch(model, QUEST_TOP_P)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = hf.output_cache(out)
    assert isinstance(cache, hf.TwilightCache)
    for layer in range(4):
        lc = cache.layer_cache(layer)
        assert lc.start.tolist() == [0, 30, 5]
        assert lc.lengths().tolist() == [50, 20, 45]


# ---------------------------------------------------------------------------------------------------- stats
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_stats_are_consistent_with_the_context(family):
    model = tiny_model(family)
    P, N, B = 80, 9, 2
    twilight.patch(model, QUEST_TOP_P)
    greedy(model, torch.cat(prompts([P] * B)), n=N)
    stats = twilight.budget_stats(model)
    d = stats.as_dict()
    # The first new token comes from prefill; each later one is a decode step over P + i tokens (i = 1..N-1).
    assert d["decode_steps"] == (N - 1) * B
    assert d["mean_context_tokens"] == pytest.approx(P + N / 2)
    assert 1 <= d["min_attended_tokens"] <= d["mean_attended_tokens"] <= d["max_attended_tokens"] <= P + N - 1
    assert d["mean_kv_tokens_read"] <= QUEST_TOP_P["selector"]["token_budget"]
    assert [row["layer"] for row in d["per_layer"]] == [0, 1, 2, 3]
    assert d["per_layer"][0]["dense"] and d["per_layer"][0]["mean_attended_tokens"] == pytest.approx(P + N / 2)
    assert all(row["steps"] == (N - 1) * B for row in d["per_layer"])
    assert all(len(heads) == 4 and max(heads) <= P + N - 1 for heads in d["per_head"])
    assert "decode steps" in stats.summary()
    stats.reset()
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 0


def test_budget_stats_context_excludes_padding():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts([60, 30]))
    twilight.patch(model, "dense")
    greedy(model, ids, mask, n=5)
    d = twilight.budget_stats(model).as_dict()
    assert d["decode_steps"] == 4 * 2
    assert d["mean_context_tokens"] == pytest.approx((60 + 30) / 2 + 2.5)


def test_budget_stats_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model("llama")
    twilight.patch(model, QUEST_TOP_P)
    greedy(model, prompts([70])[0], n=4)
    path = tmp_path / "budget.png"
    twilight.budget_stats(model).plot(str(path))
    assert path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------- generate modes
def test_sampling_beam_search_and_multiple_return_sequences():
    model = tiny_model("mistral")
    ids = torch.cat(prompts([50, 50]))
    torch.manual_seed(5)
    ref_sample = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=50)
    ref_beam = greedy(model, ids, n=6, num_beams=3)
    twilight.patch(model, "dense")
    torch.manual_seed(5)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=50), ref_sample)
    assert torch.equal(greedy(model, ids, n=6, num_beams=3), ref_beam)  # reorders the cache
    twilight.patch(model, TOP_P)
    out = model.generate(ids, max_new_tokens=6, do_sample=True, num_return_sequences=3)
    assert out.shape == (6, 56)
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 5 * 6


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_manual_forward_loop_matches_generate(keyword):
    model = tiny_model("qwen3")
    ids = torch.cat(prompts([64, 64]))
    twilight.patch(model, TOP_P)
    expected = greedy(model, ids, n=6)[:, 64:]
    twilight.budget_stats(model).reset()
    with torch.no_grad():
        out = model(ids)  # positional input, use_cache from the config
        cache = hf.output_cache(out)
        assert isinstance(cache, hf.TwilightCache) and cache.get_seq_length() == 64
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(5):
            out = model(tokens[-1][:, None], **{keyword: cache}, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), expected)
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 5 * 2
    with torch.no_grad():  # use_cache=False: a plain dense forward, no cache, nothing recorded
        assert hf.output_cache(model(ids, use_cache=False)) is None
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 5 * 2


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_user_cache_from_make_cache(keyword):
    model = tiny_model("llama")
    ids = torch.cat(prompts([40]))
    twilight.patch(model, TOP_P)
    expected = greedy(model, ids, n=5)
    twilight.budget_stats(model).reset()
    cache = hf.make_cache(model)
    out = greedy(model, ids, n=5, **{keyword: cache})
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == 44
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 4  # the user's cache went through Twilight


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"sliding_window": 24}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 2}),
])
def test_sliding_window_models_keep_their_window(family, overrides):
    model = tiny_model(family, **overrides)
    ids = torch.cat(prompts([60, 60]))
    ref = greedy(model, ids, n=10)
    twilight.patch(model, "dense")
    assert torch.equal(greedy(model, ids, n=10), ref)
    twilight.patch(model, TOP_P)
    greedy(model, ids, n=10)
    d = twilight.budget_stats(model).as_dict()
    sliding = [i for i, t in enumerate(getattr(model.config, "layer_types", None) or ["sliding_attention"] * 4)
               if t == "sliding_attention"]
    assert all(max(d["per_head"][i]) <= 24 for i in sliding)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(dtype):
    model = tiny_model("llama").to(dtype)
    ids, mask = left_pad(prompts([70, 50]))
    twilight.patch(model, QUEST_TOP_P)
    out = greedy(model, ids, mask, n=6)
    assert out.shape == (2, 76)
    assert ((out >= 0) & (out < 1000)).all()
    cache = hf.output_cache(model(input_ids=ids, attention_mask=mask))
    assert cache.layer_cache(2).k.dtype == dtype
    assert 0 < twilight.budget_stats(model).as_dict()["attended_fraction"] <= 1


def test_eager_attention_model():
    model = tiny_model("llama", attn_implementation="eager")
    ids = torch.cat(prompts([50]))
    ref = greedy(model, ids)
    twilight.patch(model, "dense")
    assert model.config._attn_implementation == "twilight_eager"
    assert torch.equal(greedy(model, ids), ref)
    twilight.unpatch(model)
    assert_unpatched(model, attn="eager")


# ---------------------------------------------------------------------------------------------------- lifecycle
def test_patch_twice_and_change_config():
    model = tiny_model("llama")
    ids = torch.cat(prompts([80]))
    ref = greedy(model, ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    twilight.patch(model, QUEST_TOP_P)
    greedy(model, ids)
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 7
    config = twilight.TwilightConfig.load("dense")
    twilight.patch(model, config)  # replaces the config and starts new stats
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 0
    config.selector.type = "streaming"  # the model keeps its own copy
    assert torch.equal(greedy(model, ids), ref)
    twilight.patch(model, "dense")
    twilight.unpatch(model)
    assert_unpatched(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(greedy(model, ids), ref)
    with pytest.raises(ValueError, match="not patched"):
        twilight.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        twilight.budget_stats(model)


def test_two_patched_models_in_one_process():
    a, b = tiny_model("llama", seed=0), tiny_model("qwen2", seed=1)
    ids = torch.cat(prompts([60]))
    ref_a = greedy(a, ids)
    twilight.patch(b, TOP_P)
    solo_b = greedy(b, ids)
    twilight.budget_stats(b).reset()
    twilight.patch(a, "dense")
    out_a, out_b, out_a2 = greedy(a, ids), greedy(b, ids), greedy(a, ids)
    assert torch.equal(out_a, ref_a) and torch.equal(out_a2, ref_a) and torch.equal(out_b, solo_b)
    assert twilight.budget_stats(a).as_dict()["decode_steps"] == 14
    assert twilight.budget_stats(b).as_dict()["decode_steps"] == 7
    assert twilight.budget_stats(a).as_dict()["attended_fraction"] == 1.0
    twilight.unpatch(a)
    assert torch.equal(greedy(b, ids), solo_b)  # b stays patched


def test_config_that_does_not_fit_leaves_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dense_layers"):
        twilight.patch(model, {**TOP_P, "dense_layers": [7]})
    assert_unpatched(model)
    with pytest.raises(twilight.ConfigError):
        twilight.patch(model, "no-such-preset")
    assert_unpatched(model)


# ---------------------------------------------------------------------------------------------------- refusals
def test_unsupported_model_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0,
                                       eos_token_id=0))
    with pytest.raises(ValueError, match=r"gpt2.*llama, mistral, qwen2, qwen3"):
        twilight.patch(model, "dense")
    assert not hf.is_patched(model) and model.config._attn_implementation != "twilight_sdpa"
    with pytest.raises(ValueError, match="PreTrainedModel"):
        twilight.patch(torch.nn.Linear(2, 2), "dense")


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "5.0.0.dev0"])
def test_unsupported_transformers_version_is_refused(monkeypatch, version):
    # transformers replaces its lazy module in sys.modules as models are imported: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match=r"transformers>=5\.0,<6"):
        twilight.patch(model, "dense")
    assert_unpatched(model)


def test_supported_range_matches_pyproject():
    hf.check_transformers_version("5.0.0")
    hf.check_transformers_version("5.23.0")
    hf.check_transformers_version("5.24.0.dev0")  # a source install of the next release
    hf.check_transformers_version(transformers.__version__)
    hf.check_transformers_version(hf.compat.OLDEST_TRANSFORMERS)  # scripts/test_transformers_range.sh tests it
    with pytest.raises(RuntimeError):
        hf.check_transformers_version("4.57.6")  # the release before the oldest is outside the range
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"transformers{hf.SUPPORTED_TRANSFORMERS}"' in pyproject


def test_right_padding_is_refused_at_decode():
    model = tiny_model("llama")
    ids, _ = left_pad(prompts([30, 20]))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding
    twilight.patch(model, TOP_P)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)  # a single forward is fine
        with pytest.raises(ValueError, match="left"):
            model(input_ids=ids[:, :1], past_key_values=hf.output_cache(out),
                  attention_mask=torch.cat([mask, mask[:, :1]], 1))


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_foreign_cache_warns_and_runs_dense(keyword):
    model = tiny_model("llama")
    ids = torch.cat(prompts([40]))
    ref = greedy(model, ids, n=4)
    twilight.patch(model, TOP_P)
    with pytest.warns(RuntimeWarning) as caught:
        out = greedy(model, ids, n=4, **{keyword: DynamicCache(config=model.config)})
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("not a Twilight cache" in m for m in messages)
    # generate() itself says that none of its decode steps went through Twilight, and why
    assert any(m.startswith("generate() ran 3 decode step(s)") and "none went through Twilight" in m
               and "DynamicCache" in m for m in messages)
    assert torch.equal(out, ref)
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 0
    assert hf.engagement(model)["decode_forwards"] == 3 and hf.engagement(model)["twilight_forwards"] == 0


def test_generate_through_twilight_does_not_warn(recwarn):
    model = tiny_model("llama")
    twilight.patch(model, TOP_P)
    greedy(model, torch.cat(prompts([40])), n=4)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert hf.engagement(model)["decode_forwards"] == hf.engagement(model)["twilight_forwards"] == 3


def test_decode_step_outside_the_patched_forward_raises():
    """A transformers release that reaches the attention layers without the decoder's forward (an unknown
    calling convention) must not decode dense in silence: the attention function refuses the step."""
    model = tiny_model("llama")
    ids = torch.cat(prompts([30]))
    twilight.patch(model, TOP_P)
    decoder = model.get_decoder()
    unwrapped = type(decoder).forward.__get__(decoder)  # the class's forward, bypassing twilight's wrapper
    kw = hf.compat.cache_parameter(unwrapped, "decoder")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        unwrapped(input_ids=ids, use_cache=True, **{kw: cache})  # prefill runs the model's own attention
        with pytest.raises(hf.TwilightNotEngagedError, match="outside the patched decoder forward"):
            unwrapped(input_ids=ids[:, -1:], use_cache=True, **{kw: cache})


def test_kv_not_from_the_twilight_cache_raises():
    class CopyingCache(hf.TwilightCache):  # hands the model copies, not the cache's own K/V
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx)
            return k.clone(), v.clone()

    model = tiny_model("llama")
    twilight.patch(model, TOP_P)
    pipeline = hf.make_cache(model).pipeline
    with pytest.raises(hf.TwilightNotEngagedError, match="not its TwilightCache's own"):
        greedy(model, torch.cat(prompts([30])), n=3, past_key_values=CopyingCache(pipeline, 4))


def test_unknown_calling_conventions_are_refused_at_patch_time(monkeypatch):
    model = tiny_model("llama")
    decoder = model.get_decoder()

    def forward_without_cache(input_ids=None, attention_mask=None, use_cache=None):  # a made-up release's forward
        raise AssertionError("never called")

    monkeypatch.setattr(decoder, "forward", forward_without_cache)
    with pytest.raises(hf.UnsupportedTransformersError, match="takes the cache under none of the names cache, "
                                                              "past_key_values"):
        twilight.patch(model, TOP_P)
    assert not hf.is_patched(model) and model.config._attn_implementation == "sdpa"
    monkeypatch.undo()

    def prepare(generation_config, kwargs, generation_mode, batch_size, max_cache_length):
        raise AssertionError("never called")

    monkeypatch.setattr(model, "_prepare_cache_for_generation", prepare)
    with pytest.raises(hf.UnsupportedTransformersError, match="has no model_kwargs parameter"):
        twilight.patch(model, TOP_P)
    assert not hf.is_patched(model)


def test_a_cache_implementation_twilight_cannot_decode_with_is_refused():
    model = tiny_model("llama")
    twilight.patch(model, TOP_P)
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        greedy(model, torch.cat(prompts([20])), n=3, cache_implementation="offloaded")


def test_changing_attn_implementation_after_patch_warns():
    model = tiny_model("llama")
    ids = torch.cat(prompts([30]))
    twilight.patch(model, TOP_P)
    model.set_attn_implementation("eager")
    with pytest.warns(RuntimeWarning, match="changed") as caught:
        greedy(model, ids, n=3)
    assert any("none went through Twilight" in str(w.message) for w in caught)
    twilight.patch(model, TOP_P)  # starts over from eager
    assert model.config._attn_implementation == "twilight_eager"
    twilight.unpatch(model)
    assert_unpatched(model, attn="eager")


# ---------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    model = tiny_model("qwen3").to("cuda", dtype)
    ids, mask = left_pad(prompts([90, 60]))
    ids, mask = ids.cuda(), mask.cuda()
    ref = greedy(model, ids, mask)
    twilight.patch(model, {**twilight.PRESETS["dense"], "backend": "torch"})
    assert torch.equal(greedy(model, ids, mask), ref)
    twilight.patch(model, QUEST_TOP_P)  # backend "auto": the fastest available on the GPU
    out = greedy(model, ids, mask)
    assert out.shape == ref.shape and out.device.type == "cuda"
    assert 0 < twilight.budget_stats(model).as_dict()["attended_fraction"] < 1
    twilight.unpatch(model)
    assert torch.equal(greedy(model, ids, mask), ref)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_map_over_two_gpus_keeps_a_cache_and_backend_per_device():
    from accelerate import dispatch_model

    model = tiny_model("llama")

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    model = dispatch_model(model, device_map=device_map)
    ids = torch.cat(prompts([90, 60])).to("cuda:0")
    ref = greedy(model, ids)
    twilight.patch(model, {**twilight.PRESETS["dense"], "backend": "torch"})
    assert torch.equal(greedy(model, ids), ref)
    twilight.patch(model, QUEST_TOP_P)
    cache = hf.make_cache(model)
    greedy(model, ids, past_key_values=cache)
    assert {cache.layer_cache(i).k.device.index for i in range(4)} == {0, 1}
    assert [cache.layer_cache(i).k.device.index for i in range(4)] == [0, 0, 1, 1]
    assert set(cache.pipeline._backends) == {torch.device("cuda:0"), torch.device("cuda:1")}
    assert twilight.budget_stats(model).as_dict()["decode_steps"] > 0
