"""The fused decode-token update (``twilight.kernels.triton.append``) against the torch update of the cache."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICES, page_bounds_reference

from twilight.cache import LayerCache
from twilight.quant import dequantize_int4, int4_params, unpack_int4

append = pytest.importorskip("twilight.kernels.triton.append", reason="needs triton")


def _pair(B, H, D, dtype, device, start, page_size):
    """Two caches fed the same keys: one updated by torch, one by the Triton kernel."""
    caches = []
    for fused in (False, True):
        c = LayerCache(B, H, D, dtype=dtype, device=device, page_size=page_size, start=start, lazy_derived=True)
        c.token_updater = append.update_token if fused else None
        caches.append(c)
    return caches


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,D,page_size", [(torch.float32, 64, 16), (torch.float16, 128, 16),
                                               (torch.bfloat16, 32, 8), (torch.float32, 16, 5)])
def test_token_updates_match_the_torch_update(device, dtype, D, page_size):
    torch.manual_seed(5)
    B, H = 2, 3
    start = torch.tensor([0, 21], device=device)
    ref, fused = _pair(B, H, D, dtype, device, start, page_size)
    assert append.supports(fused)
    k = (torch.randn(B, H, 260, D) * (1 + 3 * torch.rand(B, H, 260, 1))).to(dtype).to(device)
    v = torch.randn(B, H, 260, D).to(dtype).to(device)
    for c in (ref, fused):
        c.append(k[:, :, :100], v[:, :, :100])  # a prompt: bulk update (torch) at the first update_derived
        c.update_derived()
        for t in range(100, 260):  # decode tokens: crossing 64-token tiles (both nibbles) and pages
            c.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            c.update_derived()
    L = 260
    # scale and mid: the same float32 formula, up to the last bits. The kernel divides correctly rounded; torch on
    # a GPU divides by a scalar as a multiply by its reciprocal (seen on an H200: one ulp off). ``mid = lo + 8 scale``
    # then differs by a few ulps of its terms, which is a lot relative to a ``mid`` near 0: bounded by the terms.
    f_scale, r_scale = fused.k_qparams[:, :, :L, 0], ref.k_qparams[:, :, :L, 0]
    f_mid, r_mid = fused.k_qparams[:, :, :L, 1], ref.k_qparams[:, :, :L, 1]
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(f_scale, r_scale, rtol=2 * eps, atol=0)
    assert ((f_mid - r_mid).abs() <= 4 * eps * (r_mid.abs() + 16 * r_scale)).all()
    codes_f = unpack_int4(fused.k_int4)[:, :, :L].long()
    codes_r = unpack_int4(ref.k_int4)[:, :, :L].long()
    # codes: equal, except a value on a rounding boundary may round the other way (then they differ by one)
    assert (codes_f - codes_r).abs().max() <= 1 and (codes_f != codes_r).float().mean() < 1e-3
    # every code dequantizes to within half a step of its key (the quantization's own guarantee)
    deq = dequantize_int4(fused.k_int4, fused.k_qparams)[:, :, :L]
    step = int4_params(k.float())[..., 0:1]
    assert bool(((deq - k.float()).abs() <= step * 0.5 * (1 + 1e-5) + 1e-6).all())
    # page bounds bound every valid key of their page, and are no looser than the torch update's
    # (each sequence's pages cut from its first valid token: start 21 is not a multiple of any page size here)
    pages = -(-L // page_size)
    hi, lo = (x.to(device) for x in page_bounds_reference(k, start.cpu(), L, page_size))
    f_hi, f_lo = fused.page_bounds[:, :, :pages, 0].float(), fused.page_bounds[:, :, :pages, 1].float()
    r_hi, r_lo = ref.page_bounds[:, :, :pages, 0].float(), ref.page_bounds[:, :, :pages, 1].float()
    assert bool((f_hi >= hi).all()) and bool((f_lo <= lo).all())
    assert bool((f_hi <= r_hi).all()) and bool((f_lo >= r_lo).all())
    if dtype != torch.float32:  # keys exact in the bounds' dtype: the bounds are the exact extremes
        assert torch.equal(f_hi, r_hi) and torch.equal(f_lo, r_lo)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_unsupported_layouts_keep_the_torch_update(device):
    c = LayerCache(1, 1, 64, device=device, int4_block=32)
    assert not append.supports(c)
    c = LayerCache(1, 1, 64, device=device, quant_bits=8)
    assert not append.supports(c)
