"""``generate()`` compiles a patched model's decode step by itself, through transformers' own path.

A ``TwilightCache`` allocated once at the final length is compileable where the pipeline's backend traces (the
``torch`` and ``cpu`` backends on a CPU): ``generate(compile_config=...)`` (on a CPU, with its switch to compile on
every device) then compiles the decode forward, as it does for transformers' static cache. Checked here with
dynamo's own counters: 0 graph breaks, at most 2 graphs over 64 decode steps (the first step specialises on its
length, the second makes it symbolic: ``dynamic=None``'s automatic dynamic shapes), greedy tokens equal to the
eager patched run, every step served by Twilight with budgets > 0.

The eager reference runs the fixed-shape path (``pipeline.host_reads = False``), as a compiled step does: on a CPU
the default eager path sizes work from counts and scores int4 keys through PyTorch's bf16 GEMV, whose rounding
can keep another token at a top-p boundary.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_hf_patch import PAD, QUEST_TOP_P, left_pad, prompts, tiny_model
from torch._dynamo.utils import counters
from transformers import CompileConfig

import twilight
from twilight.integrations import hf

STEPS = 64
MAX_GRAPHS = 2  # one per step until the length changes once, then one with a symbolic length
QUEST = {**QUEST_TOP_P, "selector": {"type": "quest", "token_budget": 48, "page_size": 16}}


def _compile_config(**overrides) -> CompileConfig:
    config = CompileConfig(**overrides)
    config._compile_all_devices = True  # generate() compiles on CUDA only unless told so (transformers' switch)
    return config


def _generate(model, ids, mask=None, n=STEPS, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **kwargs)


def _eager_reference(model, spec, backend, ids, mask=None):
    twilight.patch(model, {**spec, "backend": backend})
    cache = hf.make_cache(model, max_cache_len=ids.shape[1] + STEPS - 1)
    cache.pipeline.host_reads = False  # the arithmetic a compiled step runs
    return _generate(model, ids, mask, past_key_values=cache).sequences


def _compiled(model, spec, backend, ids, mask=None):
    twilight.patch(model, {**spec, "backend": backend})
    torch._dynamo.reset()  # a fresh compile per test: earlier models' graphs count against the recompile limit
    counters.clear()
    before = hf.engagement(model)
    out = _generate(model, ids, mask, compile_config=_compile_config())
    after = hf.engagement(model)
    return out, {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
                 "decoded": after["decode_forwards"] - before["decode_forwards"],
                 "served": after["twilight_forwards"] - before["twilight_forwards"]}


@pytest.mark.parametrize("family,backend,spec", [
    ("llama", "torch", "dense"), ("llama", "torch", "quest"), ("llama", "cpu", "quest"),
    ("qwen2", "cpu", "quest"), ("mistral", "torch", "quest"),
])
def test_generate_compiles_the_decode_step(family, backend, spec):
    spec = {"dense": {"selector": {"type": "full"}, "pruner": {"type": "none"}}, "quest": QUEST}[spec]
    model = tiny_model(family, num_hidden_layers=2)
    ids = torch.cat(prompts([150]))
    reference = _eager_reference(model, spec, backend, ids)
    twilight.budget_stats(model).reset()
    out, seen = _compiled(model, spec, backend, ids)
    assert isinstance(hf.output_cache(out), hf.TwilightCache) and hf.output_cache(out).is_compileable
    assert seen["breaks"] == 0, seen
    assert 1 <= seen["graphs"] <= MAX_GRAPHS, seen
    assert seen["decoded"] == seen["served"] == STEPS - 1, seen  # every step compiled and served by Twilight
    assert torch.equal(out.sequences, reference)
    stats = twilight.budget_stats(model).as_dict()
    assert stats["decode_steps"] == STEPS - 1
    if spec is QUEST:  # budgets of the sparse layers: some tokens, fewer than the context
        assert 0 < stats["min_attended_tokens"] and stats["mean_attended_tokens"] < stats["mean_context_tokens"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_crossing_the_dense_crossover_is_one_more_graph(backend):
    """Below ``dense_below`` every layer attends densely; the step that crosses it switches to the sparse path: one
    graph more (a legitimate bucket), the derived structures kept current meanwhile (the crossing step derives one
    token, not the context), tokens still those of the eager run."""
    spec = {**QUEST, "dense_below": 170}  # 150-token prompt: 20 dense steps, then sparse
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.cat(prompts([150]))
    reference = _eager_reference(model, spec, backend, ids)
    out, seen = _compiled(model, spec, backend, ids)
    assert seen["breaks"] == 0 and seen["graphs"] <= MAX_GRAPHS + 1, seen
    assert torch.equal(out.sequences, reference)
    per_layer = twilight.budget_stats(model).as_dict()["per_layer"]
    assert per_layer[1]["mean_attended_tokens"] < 170  # the sparse steps did prune


def test_compiled_left_padded_batch_keeps_its_padding():
    """With a compileable cache generate() hands the model 4-D masks: the padding must still be read (from the
    2-D mask generate() holds), or a padded row would attend to its padding."""
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = left_pad(prompts([150, 97]))
    reference = _eager_reference(model, QUEST, "cpu", ids, mask)
    out, seen = _compiled(model, QUEST, "cpu", ids, mask)
    assert seen["breaks"] == 0 and seen["graphs"] <= MAX_GRAPHS, seen
    assert torch.equal(out.sequences, reference)
    cache = hf.output_cache(out)
    assert cache.layer_cache(1).start.tolist() == [0, 150 - 97]
    # and each row is what it decodes alone (no leak from the other row or from its padding)
    alone = _eager_reference(model, QUEST, "cpu", ids[1:, 150 - 97:])
    assert torch.equal(out.sequences[1, 150:], alone[0, 97:])


def test_a_manual_loop_compiles_the_forward_the_same_way():
    """Prefill eagerly, then ``torch.compile(model)`` for the decode steps of a cache made with its length."""
    model = tiny_model("llama", num_hidden_layers=2)
    twilight.patch(model, {**QUEST, "backend": "torch"})
    ids = torch.cat(prompts([150]))
    name = hf.compat.cache_parameter(type(model).forward, "LlamaForCausalLM")

    def decode(step, cache, n=24):
        tokens = []
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
            for _ in range(n):
                tokens.append(nxt)
                nxt = step(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
        return torch.cat(tokens, 1)

    eager_cache = hf.make_cache(model, max_cache_len=ids.shape[1] + 24)
    eager_cache.pipeline.host_reads = False
    reference = decode(model, eager_cache)
    torch._dynamo.reset()
    counters.clear()
    compiled = decode(torch.compile(model), hf.make_cache(model, max_cache_len=ids.shape[1] + 24))
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] <= MAX_GRAPHS
    assert torch.equal(compiled, reference)


def test_compiled_budget_stats_equal_eager():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.cat(prompts([150]))
    _eager_reference(model, QUEST, "torch", ids)
    eager = twilight.budget_stats(model).as_dict()
    twilight.budget_stats(model).reset()
    _compiled(model, QUEST, "torch", ids)
    compiled = twilight.budget_stats(model).as_dict()
    for key in ("decode_steps", "mean_attended_tokens", "min_attended_tokens", "max_attended_tokens",
                "mean_kv_tokens_read", "mean_context_tokens"):
        assert compiled[key] == pytest.approx(eager[key]), key
    for got, want in zip(compiled["per_head"], eager["per_head"], strict=True):
        assert (got is None and want is None) or got == pytest.approx(want)


def test_a_compile_config_that_recompiles_every_step_is_refused():
    model = tiny_model("llama", num_hidden_layers=2)
    twilight.patch(model, QUEST)
    with pytest.raises(ValueError, match="dynamic=False"):
        _generate(model, torch.cat(prompts([40])), n=4, compile_config=_compile_config(dynamic=False))


def test_compileable_only_where_the_step_traces():
    model = tiny_model("llama", num_hidden_layers=2)
    twilight.patch(model, {**QUEST, "backend": "torch"})
    assert hf.make_cache(model, max_cache_len=100).is_compileable
    assert not hf.make_cache(model).is_compileable  # a cache that grows: its shapes change when it reallocates
    twilight.patch(model, {**QUEST, "backend": "triton"})  # its launches are not registered operators yet
    assert not hf.make_cache(model, max_cache_len=100).is_compileable


def test_a_compiled_step_still_refuses_kv_that_are_not_the_caches_own():
    class CopyingCache(hf.TwilightCache):  # hands the model copies, not the cache's own K/V
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx)
            return k.clone(), v.clone()

    model = tiny_model("llama", num_hidden_layers=2)
    twilight.patch(model, {**QUEST, "backend": "torch"})
    pipeline = hf.make_cache(model).pipeline
    torch._dynamo.reset()
    ids = torch.cat(prompts([40]))
    cache = CopyingCache(pipeline, 2, max_cache_len=ids.shape[1] + 4, device="cpu")
    assert cache.is_compileable
    with pytest.raises(hf.TwilightNotEngagedError, match="not its TwilightCache's own"):
        _generate(model, ids, n=4, past_key_values=cache, compile_config=_compile_config())


def test_counters_and_stats_made_in_inference_mode_count_outside_it():
    """The engagement counters and the compiled step's running sums are updated in place: made under
    ``torch.inference_mode()`` (patch or reset there) they must still count a step run outside it, and back."""
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.cat(prompts([60]))
    with torch.inference_mode():
        twilight.patch(model, {**QUEST, "backend": "torch"})
        twilight.budget_stats(model).reset()
    torch._dynamo.reset()
    _generate(model, ids, n=4, compile_config=_compile_config())  # compiled, outside inference mode
    with torch.inference_mode():
        _generate(model, ids, n=4)  # eager, inside
    assert hf.engagement(model)["twilight_forwards"] == hf.engagement(model)["decode_forwards"] == 6
    assert twilight.budget_stats(model).as_dict()["decode_steps"] == 6
