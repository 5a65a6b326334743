"""twilight.backends: resolution, clear errors for unavailable backends, the torch reference backend."""
import importlib.util

import pytest
import torch

from twilight import BackendUnavailableError, available_backends
from twilight.attention import sparse_decode_attention
from twilight.backends import TorchBackend, resolve_backend
from twilight.cache import LayerCache
from twilight.config import BACKENDS
from twilight.contract import StepPlan
from twilight.estimate import estimate_scores
from twilight.prune import top_p_mask
from twilight.select import quest_page_scores
from twilight.selection import Selection

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


def test_error_type():
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_cpu_resolves_to_torch_or_the_cpu_kernels():
    backend = resolve_backend("torch", "cpu")
    assert isinstance(backend, TorchBackend) and backend.name == "torch"
    assert isinstance(resolve_backend("torch", torch.device("cpu")), TorchBackend)
    # auto: the fused C++ kernels where they build (a C++ compiler), the torch reference otherwise
    auto = resolve_backend("auto", "cpu")
    assert isinstance(auto, TorchBackend) and auto.name in ("cpu", "torch")


def test_auto_on_cpu_falls_back_to_torch_with_a_warning(monkeypatch):
    import warnings

    from twilight import backends

    def broken():
        raise BackendUnavailableError("no C++ compiler")

    registry = dict(backends._REGISTRY)
    registry["cpu"] = (lambda device: None, broken)
    monkeypatch.setattr(backends, "_REGISTRY", registry)
    monkeypatch.setattr(backends, "_AUTO_SKIP_WARNED", set())
    with pytest.warns(RuntimeWarning, match="skips 'cpu'.*no C\\+\\+ compiler"):
        assert resolve_backend("auto", "cpu").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", "cpu").name == "torch"  # warned once only


def test_cpu_backend_on_cuda_is_refused():
    with pytest.raises(BackendUnavailableError, match="cpu backend runs on CPU tensors"):
        resolve_backend("cpu", "cuda")


def test_cuda_on_cpu():
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("cuda", "cpu")
    msg = str(info.value)
    assert "backend='cuda'" in msg and "CUDA device" in msg and "cpu" in msg


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("triton", "cpu")
    msg = str(info.value)
    assert "backend='triton'" in msg
    if HAS_TRITON:
        assert "TRITON_INTERPRET=1" in msg and "CUDA device" in msg
    else:
        assert "not installed" in msg


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed here")
def test_triton_not_installed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="'triton' package is not installed"):
        resolve_backend("triton", "cpu")


def test_flashinfer_on_cpu():
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("flashinfer", "cpu")
    msg = str(info.value)
    assert "backend='flashinfer'" in msg
    assert ("not installed" in msg) if not HAS_FLASHINFER else ("CUDA device" in msg)


def test_unknown_backend_names_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        resolve_backend("tpu", "cpu")
    msg = str(info.value)
    assert "tpu" in msg
    for name in BACKENDS:
        assert name in msg


def test_available_backends_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    avail = available_backends("cpu")
    assert set(avail) == set(BACKENDS) - {"auto"}
    assert avail["torch"] is None
    for name in ("triton", "cuda", "flashinfer"):
        assert isinstance(avail[name], str) and avail[name]
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert available_backends("cpu")["triton"] is None  # the interpreter makes it available on the CPU


def test_torch_backend_delegates_to_the_reference_functions(make_cache):
    cache, _, _ = make_cache(1, 2, 64, 130, chunks=[100, 1, 29], quant_bits=4, page_size=16)
    assert isinstance(cache, LayerCache) and cache.length == 130
    q = torch.randn(1, 4, 64)
    sel = Selection.from_mask(torch.rand(1, 2, 130) < 0.5)
    be = TorchBackend()
    assert torch.equal(be.quest_page_scores(q, cache), quest_page_scores(q, cache))
    plan = StepPlan.for_cache(cache)
    est = be.estimate(q, cache, sel, "int4", plan)
    assert torch.equal(est, estimate_scores(q, cache, sel, "int4"))
    assert torch.equal(be.prune_top_p(est, 0.8), top_p_mask(est, 0.8))
    assert torch.equal(be.attend(q, cache, sel, 0.125, plan), sparse_decode_attention(q, cache, sel, 0.125))


@pytest.mark.gpu
def test_auto_on_cuda_resolves():
    backend = resolve_backend("auto", "cuda")
    assert backend.name in ("flashinfer", "cuda", "triton", "torch")
    assert available_backends("cuda")["cuda"] is None
