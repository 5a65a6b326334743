"""The GPU builds, checked without a GPU: csrc/ with nvcc for sm_80 and sm_90a, the torch bindings with the host
compiler, and every Triton kernel through Triton's real compiler (PTX and cubin) for both targets."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import cuda_compile_check as compile_check  # tests/kernels/, on sys.path (conftest.py)
import pytest

NVCC = compile_check.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")


@needs_nvcc
@pytest.mark.parametrize("source", compile_check.CU_SOURCES)
def test_cu_compiles_for_sm80_and_sm90a(source):
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_check.compile_cu(source, NVCC, tmp)
    assert result.ok, result.output
    archs = {k["arch"] for k in result.kernels}
    assert archs == {"sm_80", "sm_90a"}, f"ptxas compiled for {archs}"
    spilled = [k for k in result.kernels if k["spill_bytes"]]
    assert not spilled, f"register spills: {spilled}"


@pytest.mark.slow
def test_cuda_bindings_compile():
    """The CUDA variant of bindings.cpp (stream, device guard) against torch's headers (~30 s)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_check.check_bindings(NVCC, tmp)
    if not result.ok and "cuda_runtime" in result.output and NVCC is None:
        pytest.skip("no CUDA headers (nvcc not found)")
    assert result.ok, result.output


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernels_compile_for_sm80_and_sm90():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_compile_check.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
