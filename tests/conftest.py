"""Shared fixtures, reference implementations and markers for the whole test suite.

Markers (registered in pyproject.toml's ``[tool.pytest.ini_options]``, used across tests/, tests/integrations,
tests/kernels, tests/eval, tests/bench):

- ``slow``: a test that takes more than a few seconds; deselect with ``-m "not slow"``.
- ``gpu``: needs a CUDA device; skipped automatically when ``torch.cuda.is_available()`` is false.

Reference implementations (independent of the code under test, written from the semantics in the design
notes) are exposed as session-scoped fixtures so that any test module can use them, whatever pytest's
import mode:

- ``top_p_oracle(logits, p) -> bool mask``: sort-based nucleus mask (float64).
- ``top_p_margin(logits, p) -> [rows]``: distance of p from the nearest cumulative sum (ambiguity of a case).
- ``check_top_p_guarantee(logits, p, mask)``: asserts kept mass >= p, closed upwards and minimal.
- ``masked_attention_ref(q, keys, values, mask, scale) -> out``: softmax attention restricted to a mask.
- ``make_cache(...) -> (cache, k, v)``: a filled ``LayerCache`` with the K/V it holds.

Every test starts with ``torch.manual_seed(0)`` (autouse fixture), so failures reproduce.

The dense crossover (``dense_below="auto"``) would make every layer of these small test contexts dense, hiding the
sparse path the tests are about: an autouse fixture sets the automatic crossover to 0 on every device. Tests of
the crossover itself ask for the real defaults with ``@pytest.mark.real_crossover`` (or set ``dense_below``).
"""
from __future__ import annotations

import pytest
import torch

from twilight.cache import LayerCache


# ---------------------------------------------------------------------------------------------- markers
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _sparse_from_the_first_token(request, monkeypatch):
    """``dense_below="auto"`` means 0 in tests (see the module docstring), unless marked ``real_crossover``."""
    if "real_crossover" not in request.keywords:
        import twilight.config

        monkeypatch.setattr(twilight.config, "DENSE_BELOW_AUTO", {"cpu": 0, "cuda": 0})
    yield


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------- oracles
def top_p_oracle(logits: torch.Tensor, p) -> torch.Tensor:
    """Sort-based top-p: per row, the threshold probability ``v`` is the first sorted (descending)
    probability at which the cumulative mass reaches ``p``; keep every finite candidate with prob >= v.
    ``p >= 1`` keeps every finite candidate; a row without finite candidates keeps nothing.
    ``p``: float, or a tensor of shape ``logits.shape[:-1]``."""
    n = logits.shape[-1]
    x = logits.detach().to("cpu", torch.float64).reshape(-1, n)
    finite = torch.isfinite(x)
    if isinstance(p, torch.Tensor):
        ps = p.detach().to("cpu", torch.float64).reshape(-1).expand(x.shape[0])
    else:
        ps = torch.full((x.shape[0],), float(p), dtype=torch.float64)
    out = torch.zeros_like(finite)
    for r in range(x.shape[0]):
        if not finite[r].any():
            continue
        if ps[r] >= 1.0:
            out[r] = finite[r]
            continue
        probs = torch.softmax(x[r], 0)
        sorted_probs = torch.sort(probs, descending=True).values
        cum = torch.cumsum(sorted_probs, 0)
        m = min(int((cum < ps[r]).sum()), n - 1)
        out[r] = (probs >= sorted_probs[m]) & finite[r]
    return out.reshape(logits.shape)


def top_p_margin(logits: torch.Tensor, p) -> torch.Tensor:
    """Per row (shape ``logits.shape[:-1]``), how far ``p`` is from the nearest cumulative sum of the sorted
    probabilities (float64). A case with a small margin is ambiguous under float32 summation order."""
    n = logits.shape[-1]
    x = logits.detach().to("cpu", torch.float64).reshape(-1, n)
    ps = (p.detach().to("cpu", torch.float64).reshape(-1).expand(x.shape[0]) if isinstance(p, torch.Tensor)
          else torch.full((x.shape[0],), float(p), dtype=torch.float64))
    probs = torch.softmax(x, -1).nan_to_num(0.0)
    cum = torch.cumsum(torch.sort(probs, -1, descending=True).values, -1)
    margin = (cum - ps.unsqueeze(-1)).abs().amin(-1)
    return margin.masked_fill(ps >= 1.0, float("inf")).reshape(logits.shape[:-1])  # p = 1 is never ambiguous


def check_top_p_guarantee(logits: torch.Tensor, p, mask: torch.Tensor, tol: float = 1e-5) -> None:
    """The nucleus guarantees, row by row: the kept set holds >= p of the mass, it is closed upwards (every
    candidate more probable than a kept one is kept), and dropping the least probable kept group (ties
    together) leaves less than p."""
    n = logits.shape[-1]
    x = logits.detach().to("cpu", torch.float64).reshape(-1, n)
    mask = mask.detach().cpu().reshape(-1, n)
    ps = (p.detach().to("cpu", torch.float64).reshape(-1).expand(x.shape[0]) if isinstance(p, torch.Tensor)
          else torch.full((x.shape[0],), float(p), dtype=torch.float64))
    for r in range(x.shape[0]):
        finite = torch.isfinite(x[r])
        assert not (mask[r] & ~finite).any(), f"row {r}: a -inf candidate was kept"
        if not finite.any():
            assert not mask[r].any()
            continue
        assert mask[r].any(), f"row {r}: nothing kept although the row has candidates"
        probs = torch.softmax(x[r], 0)
        kept = probs[mask[r]]
        pr = float(ps[r])
        assert float(kept.sum()) >= pr - tol, f"row {r}: kept mass {float(kept.sum())} < p={pr}"
        low = float(kept.min())
        dropped = probs[finite & ~mask[r]]
        if dropped.numel():
            # closed upwards, up to float32 resolution of the weights
            assert float(dropped.max()) <= low * (1 + 1e-5) + 1e-30, f"row {r}: a more probable token was dropped"
        if pr < 1.0:
            smallest_group = mask[r] & (probs <= low * (1 + 1e-5))
            rest = float(probs[mask[r] & ~smallest_group].sum())
            assert rest < pr + tol, f"row {r}: not minimal, {rest} >= p={pr} without the smallest kept group"


def masked_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Softmax attention of ``q [B, Hq, D]`` over ``keys/values [B, Hkv, L, D]`` restricted to ``mask``
    (``[B, Hkv, L]`` or ``[B, Hq, L]`` bool), in float64; GQA groups query heads onto kv-heads."""
    B, Hq, D = q.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    k = keys.double().repeat_interleave(G, dim=1)  # [B, Hq, L, D]
    v = values.double().repeat_interleave(G, dim=1)
    if mask.shape[1] != Hq:
        mask = mask.repeat_interleave(G, dim=1)
    logits = torch.einsum("bhd,bhld->bhl", q.double(), k) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("bhl,bhld->bhd", probs, v)


def fill_cache(cache: LayerCache, T: int, chunks=None, dtype=None, scale: float = 1.0):
    """Append ``T`` random tokens to ``cache`` (optionally in the given chunk sizes); returns ``(k, v)``."""
    dtype = dtype or cache.dtype
    k = (torch.randn(cache.batch, cache.num_kv_heads, T, cache.head_dim) * scale).to(dtype)
    v = torch.randn(cache.batch, cache.num_kv_heads, T, cache.head_dim).to(dtype)
    pos = 0
    for c in (chunks or [T]):
        cache.append(k[:, :, pos:pos + c], v[:, :, pos:pos + c])
        pos += c
    assert pos == T
    return k, v


def make_cache(batch: int = 1, heads: int = 2, head_dim: int = 64, T: int = 100, *, chunks=None,
               scale: float = 1.0, **kwargs):
    """A ``LayerCache`` with ``T`` random tokens appended; returns ``(cache, k, v)``."""
    cache = LayerCache(batch, heads, head_dim, **kwargs)
    k, v = fill_cache(cache, T, chunks=chunks, scale=scale)
    return cache, k, v


@pytest.fixture(scope="session", name="top_p_oracle")
def _top_p_oracle_fixture():
    return top_p_oracle


@pytest.fixture(scope="session", name="top_p_margin")
def _top_p_margin_fixture():
    return top_p_margin


@pytest.fixture(scope="session", name="check_top_p_guarantee")
def _check_top_p_guarantee_fixture():
    return check_top_p_guarantee


@pytest.fixture(scope="session", name="masked_attention_ref")
def _masked_attention_ref_fixture():
    return masked_attention_ref


@pytest.fixture(scope="session", name="make_cache")
def _make_cache_fixture():
    return make_cache

