"""The flashinfer backend (GPU only): FlashInfer's top-p and paged decode attention against the references."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_helpers import assert_close, assert_top_p_guarantee, attention_reference, make_cache, random_selection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                       reason="needs FlashInfer (pip install 'twilight[gpu]')"),
]


@pytest.mark.parametrize("p", [0.3, 0.85, 1.0])
def test_top_p_mask(p):
    from twilight.kernels.flashinfer import top_p_mask

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3000, generator=g) * 3
    x[0, :1500] = float("-inf")
    x[1] = float("-inf")
    x[2, 1:] = float("-inf")
    mask = top_p_mask(x.cuda(), p)
    assert_top_p_guarantee(x, p, mask, tol=1e-4)


@pytest.mark.parametrize("dtype,D,G,counts", [
    (torch.float16, 128, 4, [[200, 0], [1, 129]]),
    (torch.bfloat16, 128, 8, [[150, 3], [64, 97]]),
    (torch.float16, 64, 1, [[33, 200], [128, 1]]),
])
def test_paged_decode_attention(dtype, D, G, counts):
    from twilight.kernels.flashinfer import paged_decode_attention

    cache = make_cache(2, 2, D, length=260, dtype=dtype, device="cuda", start=[0, 40])
    sel = random_selection(cache, counts, width=210, seed=2)
    q = torch.randn(2, 2 * G, D).to(dtype).cuda()
    out = paged_decode_attention(q, cache, sel, D ** -0.5)
    ref = attention_reference(q, cache, sel.to_mask(cache.length), D ** -0.5)
    assert_close(out, ref, 2e-2, "FlashInfer paged decode")


def test_backend_resolves_and_decodes():
    from twilight.backends import resolve_backend
    from twilight.pipeline import TwilightPipeline

    assert resolve_backend("flashinfer", "cuda").name == "flashinfer"
    pipe = TwilightPipeline({"selector": {"type": "quest", "token_budget": 128, "page_size": 16},
                             "estimator": {"type": "int4"}, "pruner": {"type": "top_p", "p": 0.85},
                             "dense_layers": [], "backend": "flashinfer"}, num_layers=1, num_q_heads=32, num_kv_heads=8)
    cache = pipe.new_cache(0, batch=2, num_kv_heads=8, head_dim=128, dtype=torch.float16, device="cuda")
    cache.append(torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.float16),
                 torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.float16))
    out = pipe.decode(0, torch.randn(2, 32, 128, device="cuda", dtype=torch.float16), cache, 128 ** -0.5)
    assert out.shape == (2, 32, 128) and torch.isfinite(out).all()
