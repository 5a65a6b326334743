"""twilight.quant: int4/int8 per-token min-max quantization, the tiled int4 layout, outward rounding."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight.quant import (
    INT4_TILE,
    dequantize_int4,
    dequantize_int8,
    int4_codes,
    int4_params,
    pack_int4,
    quantize_int4,
    quantize_int8,
    round_outward,
    unpack_int4,
)


def _range(x):
    x = x.double()
    return x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)


def _eps(x):
    return 1e-5 * (x.double().abs().amax(-1, keepdim=True) + 1)


def _inputs(kind, shape, g):
    if kind == "normal":
        return torch.randn(*shape, generator=g)
    if kind == "wide":  # per-token magnitudes spanning many orders
        return torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-2]).view(-1, 1)
    if kind == "offset":  # large mean, small spread
        return 100.0 + 0.01 * torch.randn(*shape, generator=g)
    if kind == "constant":
        return torch.full(shape, 3.25)
    if kind == "outlier":
        x = torch.randn(*shape, generator=g)
        x[..., 0] = 50.0
        return x
    raise AssertionError(kind)


KINDS = ["normal", "wide", "offset", "constant", "outlier"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [2, 64, 128])
def test_int4_round_trip_error_bound(kind, D):
    g = torch.Generator().manual_seed(1)
    x = _inputs(kind, (2, 3, 128, D), g)
    packed, qp = quantize_int4(x)
    assert packed.shape == (2, 3, 128, D // 2) and packed.dtype == torch.uint8
    assert qp.shape == (2, 3, 128, 2) and qp.dtype == torch.float32
    err = (dequantize_int4(packed, qp).double() - x.double()).abs()
    bound = _range(x) / 30 + _eps(x)
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [1, 3, 64])
def test_int8_round_trip_error_bound(kind, D):
    g = torch.Generator().manual_seed(2)
    x = _inputs(kind, (2, 100, D), g)
    codes, qp = quantize_int8(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and qp.shape == (2, 100, 2)
    err = (dequantize_int8(codes, qp).double() - x.double()).abs()
    bound = _range(x) / 510 + _eps(x)
    assert bool((err <= bound).all()), float((err - bound).max())


@settings(max_examples=30, deadline=None)
@given(tiles=st.integers(1, 3), half_d=st.integers(1, 40), lo=st.floats(-1e3, 1e3), spread=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2 ** 16), bf16=st.booleans())
def test_round_trip_property(tiles, half_d, lo, spread, seed, bf16):
    g = torch.Generator().manual_seed(seed)
    x = lo + spread * torch.rand(tiles * INT4_TILE, 2 * half_d, generator=g)
    if bf16:
        x = x.to(torch.bfloat16)
    packed, qp = quantize_int4(x)
    err4 = (dequantize_int4(packed, qp).double() - x.double()).abs()
    assert bool((err4 <= _range(x) / 30 + _eps(x)).all())
    codes, qp8 = quantize_int8(x)
    err8 = (dequantize_int8(codes, qp8).double() - x.double()).abs()
    assert bool((err8 <= _range(x) / 510 + _eps(x)).all())
    # the extremes of each token are represented (codes 0 and 15 / -128 and 127 are used) unless constant
    c4 = unpack_int4(packed)
    nonconst = (_range(x) > 1e-3 * (x.double().abs().amax(-1, keepdim=True) + 1)).squeeze(-1)
    assert bool((c4.amin(-1)[nonconst] == 0).all()) and bool((c4.amax(-1)[nonconst] == 15).all())


def test_int4_layout_is_tiled_dim_major():
    """byte [tile, d, c] holds channel d of token c (low nibble) and of token c + 32 (high nibble)."""
    T, D = 128, 6
    codes = torch.randint(0, 16, (T, D), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (T, D // 2)
    tiled = packed.reshape(T // INT4_TILE, D, INT4_TILE // 2)
    for t in range(T // INT4_TILE):
        for d in range(D):
            for c in (0, 5, 31):
                byte = int(tiled[t, d, c])
                assert byte & 0xF == int(codes[t * INT4_TILE + c, d])
                assert byte >> 4 == int(codes[t * INT4_TILE + c + 32, d])


def test_pack_unpack_inverse_batched():
    codes = torch.randint(0, 16, (2, 3, 192, 8), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_int4_codes_and_params_match_quantize():
    x = torch.randn(4, 64, 16)
    packed, qp = quantize_int4(x)
    assert torch.equal(int4_params(x), qp)
    codes = int4_codes(x, qp)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(pack_int4(codes), packed)
    # mid value is the code-8 level: min maps to 0, max to 15
    lo, hi = x.amin(-1), x.amax(-1)
    assert torch.allclose(qp[..., 0], (hi - lo) / 15, rtol=1e-6)
    assert torch.allclose(qp[..., 1], lo + 8 * qp[..., 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,D", [(63, 8), (64, 7), (100, 4)])
def test_pack_int4_rejects_bad_shapes(T, D):
    with pytest.raises(ValueError, match="T % 64"):
        pack_int4(torch.zeros(T, D, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_outward_bounds_and_is_tight(dtype):
    x = torch.randn(4096) * torch.logspace(-4, 4, 4096)
    x = torch.cat([x, x.to(dtype).float(), torch.tensor([0.0, 1e-42, -1e-42, 1e-30, -1e-30])])  # exact ones too
    lo, hi = round_outward(x, x, dtype)
    assert lo.dtype == dtype and hi.dtype == dtype
    assert bool((lo.float() <= x).all()) and bool((hi.float() >= x).all())
    # nearly tight: three steps of the dtype further in cross x (half a step of rounding, one of widening, one
    # smallest subnormal)
    up, down = torch.tensor(float("inf"), dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
    lo3, hi3 = lo, hi
    for _ in range(3):
        lo3, hi3 = torch.nextafter(lo3, up), torch.nextafter(hi3, down)
    assert bool((lo3.float() > x).all()) and bool((hi3.float() < x).all())


def test_round_outward_infinities_and_same_dtype():
    inf = torch.tensor([float("inf"), float("-inf")])
    lo, hi = round_outward(inf, inf, torch.bfloat16)
    assert lo.float().tolist() == [float("inf"), float("-inf")] and hi.float().tolist() == lo.float().tolist()
    x = torch.randn(10)
    lo, hi = round_outward(x, x, torch.float32)
    assert torch.equal(lo, x) and torch.equal(hi, x)
