"""The cache ``generate()`` gets is allocated once, at the call's final length: memory is the plain K/V plus its
compressed copy, nothing spare (it used to double when full: 2.0-2.4x the plain K/V after ``generate()``).
``cache_implementation="static"`` gets the same cache, and a manual loop that never says its length grows by a
quarter at a time."""
from __future__ import annotations

import math

import pytest
import torch
from test_hf_patch import QUEST_TOP_P, greedy, prompts, tiny_model
from transformers import GenerationConfig

import twilight
from twilight.cache import LayerCache
from twilight.integrations import hf


def _granule(layer) -> int:
    """What a capacity is rounded to (whole 64-token int4 tiles and whole pages, where the layer keeps them); one
    such granule is kept spare, so that a view of the held positions is never a whole buffer."""
    return math.lcm(64 if layer.quant_bits == 4 else 1, layer.page_size if layer.keep_page_bounds else 1)


def _held_bytes(cache) -> tuple[int, int]:
    """(bytes of every tensor the cache's layers hold, bytes of the plain K/V of the tokens it holds), counted from
    the tensors themselves, whatever their names."""
    held = plain = 0
    for i in range(len(cache.layers)):
        layer = cache.layer_cache(i)
        seen = set()
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                held += value.untyped_storage().nbytes()
        plain += 2 * layer.keys().nbytes
    return held, plain


@pytest.mark.parametrize("spec,max_ratio", [("dense", 1.02), (QUEST_TOP_P, 1.25)], ids=["dense", "quest-top_p"])
@pytest.mark.parametrize("impl", [None, "static"])
def test_generate_allocates_once_at_the_final_length(spec, max_ratio, impl):
    model = tiny_model(num_hidden_layers=3, head_dim=64, hidden_size=256, num_attention_heads=4)
    ids = torch.cat(prompts([900, 900]))
    ref = greedy(model, ids, n=40)
    twilight.patch(model, spec)
    allocs = []
    grow = LayerCache._alloc

    def counting_alloc(self, needed):
        allocs.append(needed)
        return grow(self, needed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LayerCache, "_alloc", counting_alloc)
        out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, cache_implementation=impl)
    if spec == "dense":
        assert torch.equal(out.sequences, ref)  # the dense preset is still exactly the model
    cache = hf.output_cache(out)
    assert isinstance(cache, hf.TwilightCache)
    final = ids.shape[1] + 40 - 1  # the last new token is never fed back
    assert len(allocs) == len(cache.layers) and set(allocs) == {final}  # once per layer, at the final length
    for i in range(len(cache.layers)):
        layer = cache.layer_cache(i)
        assert layer.length == final
        assert final + _granule(layer) <= layer.capacity < final + 2 * _granule(layer)
    held, plain = _held_bytes(cache)
    assert held <= max_ratio * plain, f"the cache holds {held / plain:.3f}x the plain K/V"
    assert twilight.budget_stats(model).as_dict()["decode_steps"] > 0


def test_static_cache_respects_max_cache_len_and_equals_the_default():
    model = tiny_model()
    ids = torch.cat(prompts([120]))
    twilight.patch(model, QUEST_TOP_P)
    default = greedy(model, ids, n=10)
    # generate(max_cache_len=...) sizes a static cache for later, longer calls (a GenerationConfig field since 5.x;
    # transformers 5.0 has none: there the static cache is sized to the call)
    knows_max_cache_len = hasattr(GenerationConfig(), "max_cache_len")
    extra = {"max_cache_len": 512} if knows_max_cache_len else {}
    out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         cache_implementation="static", return_dict_in_generate=True, **extra)
    assert torch.equal(out.sequences, default)  # the same Twilight decode, only the allocation differs
    layer = hf.output_cache(out).layer_cache(1)
    want = 512 if knows_max_cache_len else 120 + 10 - 1
    assert want + _granule(layer) <= layer.capacity < want + 2 * _granule(layer)


def test_a_manual_loop_grows_by_a_quarter():
    cache = LayerCache(1, 2, 16, page_size=16)
    caps = [cache.capacity]
    cache.append(torch.randn(1, 2, 1000, 16), torch.randn(1, 2, 1000, 16))
    caps.append(cache.capacity)
    for _ in range(3000):
        cache.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        if cache.capacity != caps[-1]:
            caps.append(cache.capacity)
    assert caps[1] < 1000 + 2 * 64  # a prompt: exactly its length (rounded to a granule) plus a spare granule
    for before, after in zip(caps[1:], caps[2:], strict=False):
        assert after <= 1.25 * before + 2 * 64  # never more than a quarter spare (plus rounding and a spare granule)
    assert len(caps) < 12  # and few reallocations: amortised O(1) per token
    assert cache.capacity < 1.25 * cache.length + 2 * 64


def test_make_cache_with_max_cache_len_allocates_it():
    model = tiny_model()
    twilight.patch(model, QUEST_TOP_P)
    cache = hf.make_cache(model, max_cache_len=300)
    name = hf.compat.cache_parameter(type(model).forward, "LlamaForCausalLM")
    with torch.no_grad():
        model(input_ids=torch.cat(prompts([100])), use_cache=True, **{name: cache})
    layer = cache.layer_cache(1)  # (layer 0 is dense)
    assert 300 + _granule(layer) <= layer.capacity < 300 + 2 * _granule(layer)
