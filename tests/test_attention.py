"""twilight.attention: sparse decode attention over a Selection equals masked dense attention."""
import pytest
import torch
import torch.nn.functional as F

from twilight._tensors import compact
from twilight.attention import dense_decode_attention, sparse_decode_attention
from twilight.cache import LayerCache
from twilight.selection import Selection


def _setup(B, Hkv, G, D, L, start=None, dtype=torch.float32):
    cache = LayerCache(B, Hkv, D, dtype=dtype, quant_bits=None, keep_page_bounds=False, start=start)
    k = (torch.randn(B, Hkv, L, D) * 2).to(dtype)
    v = torch.randn(B, Hkv, L, D).to(dtype)
    cache.append(k, v)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    return cache, q, k, v


def _sdpa_ref(q, k, v, start, scale):
    """torch SDPA over the whole cache, GQA by repeating kv-heads, left padding masked out."""
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    L = k.shape[2]
    mask = (torch.arange(L).view(1, 1, 1, L) >= start.view(-1, 1, 1, 1))
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float().repeat_interleave(G, 1),
                                         v.float().repeat_interleave(G, 1), attn_mask=mask, scale=scale)
    return out.squeeze(2)


@pytest.mark.parametrize("B,Hkv,G,D,L", [(1, 1, 1, 64, 1), (2, 2, 4, 32, 77), (3, 4, 2, 16, 300)])
def test_dense_equals_sdpa(masked_attention_ref, B, Hkv, G, D, L):
    start = torch.tensor([0, L // 2, L - 1][:B])
    cache, q, k, v = _setup(B, Hkv, G, D, L, start=start)
    scale = D ** -0.5
    out = dense_decode_attention(q, cache, scale)
    assert out.shape == (B, Hkv * G, D) and out.dtype == q.dtype
    assert torch.allclose(out, _sdpa_ref(q, k, v, start, scale), atol=1e-5)
    mask = (torch.arange(L).view(1, 1, -1) >= start.view(-1, 1, 1)).expand(B, Hkv, L)
    assert torch.allclose(out.double(), masked_attention_ref(q, k, v, mask, scale), atol=1e-5)
    # the full-range selection takes the same path
    full = sparse_decode_attention(q, cache, Selection.full(B, Hkv, L, start=start), scale)
    assert torch.allclose(full, out, atol=1e-6)


def _selections(B, Hkv, L, start, g):
    valid = (torch.arange(L).view(1, 1, -1) >= start.view(-1, 1, 1)).expand(B, Hkv, L)
    out = []
    for density in (0.02, 0.3, 1.0):
        out.append(Selection.from_mask(valid & (torch.rand(B, Hkv, L, generator=g) < density)))
    perm = torch.argsort(torch.rand(B, Hkv, L, generator=g), -1).to(torch.int32)  # unsorted rows
    keep = (perm.long() >= start.view(-1, 1, 1)) & (torch.rand(B, Hkv, L, generator=g) < 0.4)
    idx, counts = compact(perm, keep)
    out.append(Selection(idx, counts))
    one = torch.zeros(B, Hkv, L, dtype=torch.bool)
    one[..., L - 1] = True
    out.append(Selection.from_mask(one))
    return out


@pytest.fixture(params=["flat", "padded"])
def attend_path(request):
    """Both code paths: exactly the selected tokens, flattened (CPU with host reads), and all rows padded to the
    selection's width (fixed shapes, as on a GPU)."""
    return request.param


@pytest.mark.parametrize("B,Hkv,G,D,L", [(1, 2, 1, 64, 100), (2, 2, 4, 32, 257), (2, 1, 3, 8, 40)])
def test_sparse_equals_masked_attention(masked_attention_ref, attend_path, B, Hkv, G, D, L):
    start = torch.tensor([0, 11][:B])
    cache, q, k, v = _setup(B, Hkv, G, D, L, start=start)
    scale = D ** -0.5
    for sel in _selections(B, Hkv, L, start, torch.Generator().manual_seed(L)):
        out = sparse_decode_attention(q, cache, sel, scale, host_reads=attend_path == "flat")
        ref = masked_attention_ref(q, k, v, sel.to_mask(L), scale)
        assert out.shape == (B, Hkv * G, D)
        assert torch.allclose(out.double(), ref, atol=1e-5), float((out.double() - ref).abs().max())


def test_sparse_full_mask_equals_dense(attend_path):
    cache, q, k, v = _setup(2, 2, 2, 16, 90, start=torch.tensor([0, 30]))
    sel = Selection.from_mask(Selection.full(2, 2, 90, start=cache.start).to_mask(90))
    assert not sel.is_full_range  # the gather path
    out = sparse_decode_attention(q, cache, sel, 0.25, host_reads=attend_path == "flat")
    assert torch.allclose(out, dense_decode_attention(q, cache, 0.25), atol=1e-5)


def test_empty_row_yields_zeros(masked_attention_ref, attend_path):
    cache, q, k, v = _setup(1, 2, 2, 8, 20)
    mask = torch.zeros(1, 2, 20, dtype=torch.bool)
    mask[0, 1, 3:7] = True
    out = sparse_decode_attention(q, cache, Selection.from_mask(mask), 0.3, host_reads=attend_path == "flat")
    assert torch.equal(out[0, :2], torch.zeros(2, 8))  # query heads 0, 1 belong to the empty kv-head 0
    assert torch.allclose(out.double(), masked_attention_ref(q, k, v, mask, 0.3), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(masked_attention_ref, dtype):
    cache, q, k, v = _setup(1, 2, 2, 32, 128, dtype=dtype)
    sel = Selection.from_mask(torch.rand(1, 2, 128) < 0.5)
    out = sparse_decode_attention(q, cache, sel, 32 ** -0.5)
    assert out.dtype == dtype
    ref = masked_attention_ref(q, k, v, sel.to_mask(128), 32 ** -0.5)
    assert torch.allclose(out.double(), ref, atol=2e-2)
    dense = dense_decode_attention(q, cache, 32 ** -0.5)
    assert dense.dtype == dtype
    assert torch.allclose(dense.double(), _sdpa_ref(q, k, v, cache.start, 32 ** -0.5).double(), atol=2e-2)


def test_errors():
    cache, q, _, _ = _setup(1, 2, 2, 8, 20)
    sel = Selection.full(1, 2, 20)
    for shape in [(1, 3, 8), (2, 4, 8), (1, 4, 16)]:
        with pytest.raises(ValueError, match="q must be"):
            sparse_decode_attention(torch.randn(*shape), cache, sel, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        sparse_decode_attention(q.half(), cache, sel, 1.0)
    with pytest.raises(ValueError, match="selection"):
        sparse_decode_attention(q, cache, Selection.full(1, 3, 20), 1.0)
