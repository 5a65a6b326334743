"""twilight.integrations.capture: recorded q/k/v are the model's own; Double Sparsity calibrates from them."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import twilight
from twilight.integrations.capture import calibrate_double_sparse, capture_qkv
from twilight.select.double_sparse import load_channels


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0,
                      initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def test_capture_matches_the_cache_and_leaves_outputs_unchanged():
    model = _tiny_llama()
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        ref_logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    records = capture_qkv(model, ids)
    assert sorted(records) == [0, 1, 2]
    for layer, rec in records.items():
        assert rec["q"].shape == (2, 4, 40, 16) and rec["k"].shape == (2, 2, 40, 16)
        # post-RoPE keys and values, as the model's own cache stores them
        assert torch.allclose(rec["k"], cache.layers[layer].keys, atol=1e-6)
        assert torch.allclose(rec["v"], cache.layers[layer].values, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, ref_logits, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored
    last = capture_qkv(model, ids, last_query_only=True)
    assert torch.equal(last[1]["q"], records[1]["q"][:, :, -1])


def test_calibrate_double_sparse_then_patch(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(2))
    path = tmp_path / "channels.json"
    channels = calibrate_double_sparse(model, ids, num_channels=4, path=path)
    assert sorted(channels) == [0, 1, 2] and channels[0].shape == (2, 4)
    assert torch.equal(load_channels(str(path), 2, 4), channels[2])
    twilight.patch(model, {"selector": {"type": "double_sparse", "channels_path": str(path), "num_channels": 4,
                                        "token_budget": 16}, "estimator": "int4",
                           "pruner": {"type": "top_p", "p": 0.9}, "dense_layers": [0]})
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 68)
    stats = twilight.budget_stats(model).as_dict()
    assert 1 <= stats["mean_attended_tokens"] <= 16  # at most the selector's budget per head
    with pytest.raises(ValueError, match="unpatched"):
        capture_qkv(model, ids)
    twilight.unpatch(model)
