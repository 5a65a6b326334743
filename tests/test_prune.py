"""twilight.prune: sorting-free top-p against a sort-based oracle; top-k and threshold against simple oracles."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight.config import PrunerConfig
from twilight.prune import prune_mask, threshold_mask, top_k_mask, top_p_mask

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def assert_top_p(top_p_oracle, top_p_margin, check_top_p_guarantee):
    """``top_p_mask(logits, p)`` equals the oracle; where it does not, the row must be numerically ambiguous
    (p within 1e-5 of a cumulative sum, or the differing tokens tied with the threshold to float32
    precision) and the nucleus guarantees must still hold."""

    def check(logits, p, mask=None):
        mask = top_p_mask(logits, p) if mask is None else mask
        assert mask.shape == logits.shape and mask.dtype == torch.bool
        expected = top_p_oracle(logits, p)
        if torch.equal(mask, expected):
            return mask
        n = logits.shape[-1]
        diff_rows = (mask != expected).reshape(-1, n).any(-1)
        margin = top_p_margin(logits, p).reshape(-1)
        x = logits.double().reshape(-1, n)
        probs = torch.softmax(x, -1).nan_to_num(0.0)
        for r in diff_rows.nonzero().flatten().tolist():
            exp_r = expected.reshape(-1, n)[r]
            v = float(probs[r][exp_r].min())  # oracle threshold
            differing = probs[r][(mask.reshape(-1, n)[r] != exp_r)]
            tied = bool(((differing - v).abs() <= 1e-5 * v).all())
            assert margin[r] < 1e-5 or tied, f"row {r}: differs from the sort-based oracle (margin {margin[r]:.2e})"
        check_top_p_guarantee(logits, p, mask)
        return mask

    return check


def _dist(kind, rows, n, g):
    if kind == "normal":
        return torch.randn(rows, n, generator=g)
    if kind == "peaked":  # a few tokens dominate
        return torch.randn(rows, n, generator=g) * 20
    if kind == "very_peaked":
        return torch.randn(rows, n, generator=g) * 200
    if kind == "flat":
        return torch.randn(rows, n, generator=g) * 1e-3
    if kind == "equal":
        return torch.zeros(rows, n)
    if kind == "ties":  # few distinct values, many exact ties
        return torch.randint(-3, 4, (rows, n), generator=g).float()
    if kind == "neg_inf":
        x = torch.randn(rows, n, generator=g) * 3
        x[torch.rand(rows, n, generator=g) < 0.5] = NEG_INF
        x[:, 0] = 0.0  # at least one candidate per row
        return x
    if kind == "heavy_tail":
        return -torch.log(torch.rand(rows, n, generator=g)) * 4
    raise AssertionError(kind)


KINDS = ["normal", "peaked", "very_peaked", "flat", "equal", "ties", "neg_inf", "heavy_tail"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 300, 4096])
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.85, 0.95, 0.999, 1.0])
def test_top_p_matches_oracle(assert_top_p, kind, n, p):
    g = torch.Generator().manual_seed(KINDS.index(kind) * 10_000 + n)
    rows = 2 if n == 4096 else 6
    logits = _dist(kind, rows, n, g)
    mask = assert_top_p(logits, p)
    assert bool(mask.any(-1).all()), "every row with a candidate keeps at least one token"


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), scale=st.floats(1e-4, 100.0), p=st.floats(1e-6, 1.0), ties=st.booleans(),
       inf_frac=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2 ** 20))
def test_top_p_property(assert_top_p, n, scale, p, ties, inf_frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n, generator=g) * scale
    if ties:
        x = torch.round(x)
    x[torch.rand(4, n, generator=g) < inf_frac] = NEG_INF
    mask = assert_top_p(x, p)
    finite = torch.isfinite(x)
    assert torch.equal(mask.any(-1), finite.any(-1))


def test_top_p_docstring_example():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_mask(torch.log(probs), 0.8).tolist() == [[True, True, False, False]]
    assert top_p_mask(torch.log(probs), 0.81).tolist() == [[True, True, True, False]]
    assert top_p_mask(torch.log(probs), 0.5).tolist() == [[True, False, False, False]]
    assert top_p_mask(torch.log(probs), 0.96).tolist() == [[True, True, True, True]]


def test_top_p_ties_at_threshold_all_kept():
    x = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert top_p_mask(x, 0.5).tolist() == [[True, True, True, True]]
    x = torch.zeros(1, 10)
    assert bool(top_p_mask(x, 0.01).all())  # all equal: the threshold group is everything


def test_top_p_tiny_p_keeps_the_max_group():
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0, NEG_INF]])
    assert top_p_mask(x, 1e-6).tolist() == [[False, True, True, False, False]]


def test_top_p_one_keeps_every_finite_candidate_even_underflowed():
    x = torch.tensor([[0.0, -1000.0, NEG_INF, -200.0, 5.0]])
    assert top_p_mask(x, 1.0).tolist() == [[True, True, False, True, True]]
    assert top_p_mask(x, torch.tensor([1.0])).tolist() == [[True, True, False, True, True]]


def test_top_p_all_neg_inf_rows_keep_nothing():
    x = torch.randn(3, 10)
    x[1] = NEG_INF
    for p in (0.5, 1.0, torch.tensor([0.3, 0.9, 1.0])):
        mask = top_p_mask(x, p)
        assert not mask[1].any() and bool(mask[0].any()) and bool(mask[2].any())


def test_top_p_single_element():
    assert top_p_mask(torch.tensor([[2.0]]), 0.3).tolist() == [[True]]
    assert top_p_mask(torch.tensor([[NEG_INF]]), 0.3).tolist() == [[False]]
    assert top_p_mask(torch.tensor([7.0]), 0.3).tolist() == [True]  # 1-d logits: one row


def test_top_p_per_row_p(assert_top_p):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 500, generator=g) * 4
    x[0, 1, ::3] = NEG_INF
    p = torch.tensor([[0.1, 0.5, 0.9], [1.0, 0.999, 1e-6]])
    mask = assert_top_p(x, p)
    for i in range(2):
        for j in range(3):
            assert torch.equal(mask[i, j], top_p_mask(x[i, j], float(p[i, j])))
    # a 0-dim tensor p applies to every row
    assert torch.equal(top_p_mask(x, torch.tensor(0.7)), top_p_mask(x, 0.7))


def test_top_p_monotone_in_p():
    x = torch.randn(8, 1000) * 3
    prev = None
    for p in (0.05, 0.2, 0.5, 0.8, 0.9, 0.99, 1.0):
        mask = top_p_mask(x, p)
        if prev is not None:
            assert bool((mask | ~prev).all()), "a larger p must keep a superset"
        prev = mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_top_p_other_dtypes(assert_top_p, dtype):
    x = (torch.randn(4, 257) * 5).to(dtype)
    x[0, :10] = NEG_INF
    assert_top_p(x, 0.9)


def test_top_p_batched_shape(assert_top_p):
    x = torch.randn(2, 4, 3, 100) * 2
    mask = assert_top_p(x, 0.8)
    assert mask.shape == (2, 4, 3, 100)


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_top_p_bad_p(p):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        top_p_mask(torch.randn(2, 5), p)


@pytest.mark.parametrize("p", [torch.tensor([0.5, 0.0]), torch.tensor([0.5, 1.01]), torch.tensor([float("nan"), 0.5])])
def test_top_p_bad_per_row_p(p):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        top_p_mask(torch.randn(2, 5), p)


def test_top_p_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        top_p_mask(torch.randn(2, 5), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="float"):
        top_p_mask(torch.randn(2, 5), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="floating point"):
        top_p_mask(torch.ones(2, 5, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="dimension"):
        top_p_mask(torch.tensor(1.0), 0.5)


# ---------------------------------------------------------------------------------------------- top-k
def _check_top_k(x, k, mask):
    finite = torch.isfinite(x)
    assert not (mask & ~finite).any()
    assert mask.sum(-1).tolist() == torch.clamp(finite.sum(-1), max=k).tolist()
    for r in range(x.shape[0]):
        kept, dropped = x[r][mask[r]], x[r][finite[r] & ~mask[r]]
        if kept.numel() and dropped.numel():
            assert float(kept.min()) >= float(dropped.max())


@pytest.mark.parametrize("k", [1, 3, 50, 1000])
@pytest.mark.parametrize("kind", ["normal", "ties", "neg_inf", "equal"])
def test_top_k(k, kind):
    x = _dist(kind, 5, 60, torch.Generator().manual_seed(k))
    x[4] = NEG_INF
    mask = top_k_mask(x, k)
    _check_top_k(x, k, mask)
    assert not mask[4].any()


@pytest.mark.parametrize("k", [0, -1, 2.0, True, None])
def test_top_k_bad_k(k):
    with pytest.raises(ValueError, match="k="):
        top_k_mask(torch.randn(2, 5), k)


# ---------------------------------------------------------------------------------------------- threshold
@pytest.mark.parametrize("t", [1e-4, 0.01, 0.2, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "neg_inf"])
def test_threshold(t, kind):
    x = _dist(kind, 6, 200, torch.Generator().manual_seed(11))
    x[5] = NEG_INF
    mask = threshold_mask(x, t)
    probs = torch.softmax(x.double(), -1).nan_to_num(0.0)
    finite = torch.isfinite(x)
    expected = ((probs >= t) | (x == x.amax(-1, keepdim=True))) & finite
    near = ((probs - t).abs() <= 1e-6 * t)  # float32 vs float64 at the boundary
    assert bool(((mask == expected) | near).all())
    assert not mask[5].any() and bool(mask[:5].any(-1).all())


@pytest.mark.parametrize("t", [0, -0.5, 1.5, float("nan")])
def test_threshold_bad(t):
    with pytest.raises(ValueError, match="threshold"):
        threshold_mask(torch.randn(2, 5), t)


# ---------------------------------------------------------------------------------------------- dispatch
def test_prune_mask_dispatch():
    x = torch.randn(3, 64) * 3
    x[0, 5] = NEG_INF
    assert torch.equal(prune_mask(x, PrunerConfig(type="top_p", p=0.7)), top_p_mask(x, 0.7))
    assert torch.equal(prune_mask(x, PrunerConfig(type="top_k", k=5)), top_k_mask(x, 5))
    assert torch.equal(prune_mask(x, PrunerConfig(type="threshold", threshold=0.05)), threshold_mask(x, 0.05))
    assert torch.equal(prune_mask(x, PrunerConfig(type="none")), torch.isfinite(x))
    with pytest.raises(ValueError, match="pruner.type"):
        prune_mask(x, PrunerConfig(type="top_z"))


def test_top_p_guarantee_statement():
    """The module docstring's guarantee, checked directly: kept mass >= p and minimal."""
    x = torch.randn(16, 2000) * 2.5
    for p in (0.3, 0.85, 0.99):
        mask = top_p_mask(x, p)
        probs = torch.softmax(x.double(), -1)
        kept_mass = (probs * mask).sum(-1)
        assert bool((kept_mass >= p - 1e-5).all())
        smallest = probs.masked_fill(~mask, math.inf).amin(-1, keepdim=True)
        without = (probs * (mask & (probs > smallest * (1 + 1e-6)))).sum(-1)
        assert bool((without < p + 1e-5).all())


def test_guarantee_checker_itself(check_top_p_guarantee):
    """The fallback checker used for float-ambiguous cases accepts top_p_mask and rejects broken masks."""
    x = torch.randn(4, 300) * 3
    x[1, ::2] = NEG_INF
    mask = top_p_mask(x, 0.8)
    check_top_p_guarantee(x, 0.8, mask)
    top = x.argmax(-1)
    broken = mask.clone()
    broken[0, top[0]] = False  # drops the most probable token
    with pytest.raises(AssertionError):
        check_top_p_guarantee(x, 0.8, broken)
    with pytest.raises(AssertionError):  # keeps too much: not minimal
        check_top_p_guarantee(x, 0.8, torch.isfinite(x))
    with pytest.raises(AssertionError):  # keeps too little
        check_top_p_guarantee(x, 0.99, mask)
