"""The ``cpu`` backend's C++ kernels (``csrc/cpu_decode.cpp``) against the torch reference.

- ``update_token``: the same codes, scale and mid as ``LayerCache._update_one`` (bit for bit), and page bounds that
  bound the keys (float32 bounds: exactly the extremes; bf16: the tightest bf16 values on either side).
- ``top_p_attend``: each query head's kept count and each kv-head's union equal the sort-based top-p oracle's
  (where ``p`` is not on a float boundary), and the output is exact attention over the returned union.
- Through the pipeline: the cpu and torch backends attend the same tokens and give the same outputs.
"""
from __future__ import annotations

import pytest
import torch

from twilight.cache import LayerCache
from twilight.contract import BackendUnavailableError
from twilight.pipeline import TwilightPipeline
from twilight.quant import unpack_int4

cpu_kernels = pytest.importorskip("twilight.kernels.cpu")


@pytest.fixture(scope="module")
def ops():
    try:
        return cpu_kernels.load()
    except BackendUnavailableError as err:  # no C++ compiler here
        pytest.skip(str(err))


def _caches(block, bounds_dtype, start):
    """Two identical caches: one for the torch update, one for the C++ one."""
    return [LayerCache(2, 3, 64, page_size=16, start=start, lazy_derived=True, int4_block=block,
                       bounds_dtype=bounds_dtype) for _ in range(2)]


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("bounds_dtype", [torch.float32, torch.bfloat16])
def test_update_token_matches_the_torch_update(ops, block, bounds_dtype):
    from twilight.kernels.cpu import CpuBackend

    torch.manual_seed(2)
    start = torch.tensor([0, 9])
    ref, fused = _caches(block, bounds_dtype, start)
    fused.token_updater = CpuBackend().token_updater(fused)
    assert fused.token_updater is not None
    k = torch.randn(2, 3, 300, 64) * (1 + 3 * torch.rand(2, 3, 300, 1))
    v = torch.randn(2, 3, 300, 64)
    for c in (ref, fused):
        c.append(k[:, :, :70], v[:, :, :70])
        c.update_derived()
        for t in range(70, 300):
            c.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            c.update_derived()
    L = 300
    assert torch.equal(fused.k_qparams[:, :, :L], ref.k_qparams[:, :, :L])
    assert torch.equal(unpack_int4(fused.k_int4, block)[:, :, :L], unpack_int4(ref.k_int4, block)[:, :, :L])
    pages = -(-L // 16)
    f, r = fused.page_bounds[:, :, :pages].float(), ref.page_bounds[:, :, :pages].float()
    if bounds_dtype == torch.float32:
        assert torch.equal(f, r)  # exact extremes
    else:
        pos = torch.arange(pages * 16)
        valid = ((pos >= start.view(-1, 1)) & (pos < L)).view(2, 1, pages, 16, 1)
        kp = torch.nn.functional.pad(k, (0, 0, 0, pages * 16 - L)).view(2, 3, pages, 16, 64)
        hi = kp.masked_fill(~valid, float("-inf")).amax(3)
        lo = kp.masked_fill(~valid, float("inf")).amin(3)
        assert bool((f[:, :, :, 0] >= hi).all()) and bool((f[:, :, :, 1] <= lo).all())
        assert bool((f[:, :, :, 0] <= r[:, :, :, 0]).all()) and bool((f[:, :, :, 1] >= r[:, :, :, 1]).all())


@pytest.mark.parametrize("G,p", [(1, 0.85), (3, 0.85), (4, 0.5), (2, 0.99), (3, 1.0)])
def test_top_p_attend_matches_the_oracle(ops, top_p_oracle, top_p_margin, masked_attention_ref, G, p):
    torch.manual_seed(G)
    B, H, D, L = 2, 2, 32, 700
    cache = LayerCache(B, H, D, quant_bits=None, keep_page_bounds=False)
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    cache.append(k, v)
    # candidates: a random subset per row, different counts, padding slots pointing anywhere
    counts = torch.tensor([[500, 37], [1, 650]], dtype=torch.int32)
    K = 650
    cand = torch.stack([torch.stack([torch.randperm(L)[:K] for _ in range(H)]) for _ in range(B)]).to(torch.int32)
    scores = torch.randn(B, H * G, K) * 4
    scores[:, :, :3] += 12  # a few heavy tokens per row, a long tail
    valid = (torch.arange(K) < counts.repeat_interleave(G, 1).unsqueeze(-1))
    scores = scores.masked_fill(~valid, float("-inf"))
    q = torch.randn(B, H * G, D)
    scale = 0.3
    out, q_counts, kept, kv_counts = ops.top_p_attend(scores, cand, counts, p, scale, q, cache.k, cache.v)
    logits = (scores * scale).double()
    oracle = top_p_oracle(logits, p)  # [B, Hq, K] over candidate slots
    sure = top_p_margin(logits, p) > 1e-5  # p not on a float boundary
    assert torch.equal(q_counts[sure], oracle.sum(-1, dtype=torch.int32)[sure])
    union = oracle.view(B, H, G, K).any(2)
    for b in range(B):
        for h in range(H):
            n = int(kv_counts[b, h])
            got = set(kept[b, h, :n].tolist())
            assert len(got) == n  # no duplicates
            if bool(sure.view(B, H, G)[b, h].all()):
                assert got == set(cand[b, h][union[b, h]].tolist())
    mask = torch.zeros(B, H, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            mask[b, h, kept[b, h, :int(kv_counts[b, h])].long()] = True
    assert torch.allclose(out.double(), masked_attention_ref(q, k, v, mask, scale), atol=1e-5)


@pytest.mark.parametrize("start", [None, [0, 45]])
def test_cpu_and_torch_backends_agree_through_the_pipeline(ops, start):
    torch.manual_seed(4)
    B, Hq, Hkv, D, L = 2, 8, 2, 64, 1200
    cfg = {"selector": {"type": "quest", "token_budget": 512, "page_size": 16}, "estimator": "int4",
           "pruner": {"type": "top_p", "p": 0.85}, "dense_layers": [], "dense_below": 0}
    k, v = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    k[:, :, ::97] *= 4  # a few keys the queries will like
    q = torch.randn(B, Hq, D) * 2
    results = {}
    for backend in ("torch", "cpu"):
        pipe = TwilightPipeline(dict(cfg, backend=backend), num_layers=1, num_q_heads=Hq, num_kv_heads=Hkv)
        cache = pipe.new_cache(0, B, Hkv, D, start=None if start is None else torch.tensor(start))
        cache.append(k[:, :, :L - 3], v[:, :, :L - 3])
        for t in range(L - 3, L):  # decode tokens: the token updates run too
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            out = pipe.decode(0, q, cache, D ** -0.5)
        results[backend] = out, pipe.stats.as_dict()
    (out_t, st_t), (out_c, st_c) = results["torch"], results["cpu"]
    assert st_c["per_head"] == st_t["per_head"]  # the same kept counts per query head
    assert torch.allclose(out_c, out_t, atol=1e-4), float((out_c - out_t).abs().max())
    assert st_c["mean_attended_tokens"] < 0.5 * 512  # sparse
