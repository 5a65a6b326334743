"""The GPU builds, checked without a GPU: csrc/ with nvcc for sm_80 and sm_90a (registers, spills, and each
kernel's static + dynamic shared memory against the launch limit), the torch bindings with the host compiler, and
every Triton kernel through Triton's real compiler (PTX and cubin) for both targets."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cuda_compile_check as compile_check  # tests/kernels/, on sys.path (conftest.py)
import pytest

from twilight.kernels.cuda import csrc_dir

NVCC = compile_check.find_nvcc()
CXX = compile_check.find_cxx()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")


@needs_nvcc
@needs_cxx
@pytest.mark.parametrize("source", compile_check.CU_SOURCES)
def test_cu_compiles_for_sm80_and_sm90a(source):
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_check.compile_cu(source, NVCC, tmp)
        assert result.ok, result.output
        contracts = compile_check.smem_contracts(source, tmp)
    archs = {k["arch"] for k in result.kernels}
    assert archs == {"sm_80", "sm_90a"}, f"ptxas compiled for {archs}"
    spilled = [k for k in result.kernels if k["spill_bytes"]]
    assert not spilled, f"register spills: {spilled}"
    assert contracts, f"{source} declares no shared-memory contract"
    problems = compile_check.check_smem(result.kernels, contracts)
    assert not problems, "\n".join(problems)


# A kernel shaped like the top-p kernel before the fix: up to 12288 float weights (48 KiB) of dynamic shared
# memory plus 768 B of static reduction scratch. With OPT_IN its launcher raises the limit first (to 16384 weights).
_ROW_KERNEL = r"""
#include "twilight_cuda.cuh"
namespace twilight {
namespace {
constexpr int kMaxWeights = OPT_IN ? 16384 : 12288;
__global__ void __launch_bounds__(256) row_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  TW_DYNAMIC_SMEM(float, cached);
  __shared__ float scratch[192];
  if (threadIdx.x < 192) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += 192) {
      cached[i] = x[i];
      s += x[i];
    }
    scratch[threadIdx.x] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = cached[n - 1];
    for (int i = 0; i < 192; ++i) t += scratch[i];
    out[0] = t;
  }
}
TW_SMEM_CONTRACT(row_sum_kernel, sizeof(float) * kMaxWeights, OPT_IN);
}  // namespace
void row_sum(const float* x, float* out, int n) {
  auto kernel = row_sum_kernel;
  if (OPT_IN) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sizeof(float) * kMaxWeights);
  TW_LAUNCH(kernel, dim3(1), dim3(256), sizeof(float) * n, nullptr, x, out, n);
}
}  // namespace twilight
"""


def _row_kernel_dir(tmp: str, opt_in: bool) -> Path:
    d = Path(tmp) / ("opt_in" if opt_in else "default")
    d.mkdir()
    for header in ("twilight_cuda.cuh", "cuda_emulation.h"):
        shutil.copy(csrc_dir() / header, d / header)
    (d / "row_sum.cu").write_text(f"#define OPT_IN {'true' if opt_in else 'false'}\n" + _ROW_KERNEL)
    return d


@needs_nvcc
@needs_cxx
def test_smem_check_catches_static_plus_dynamic_over_48k():
    """The check fails a kernel whose launcher may ask for 48 KiB of dynamic shared memory on top of static
    shared memory without opting in (the old top-p kernel's bug), and passes it once the launcher opts in."""
    with tempfile.TemporaryDirectory() as tmp:
        for opt_in in (False, True):
            d = _row_kernel_dir(tmp, opt_in)
            result = compile_check.compile_cu("row_sum.cu", NVCC, tmp, csrc=d)
            assert result.ok, result.output
            assert {k["smem_bytes"] for k in result.kernels} == {768}, result.kernels
            contracts = compile_check.smem_contracts("row_sum.cu", tmp, csrc=d)
            assert contracts == {"row_sum_kernel": (65536 if opt_in else 49152, opt_in)}
            problems = compile_check.check_smem(result.kernels, contracts)
            if opt_in:
                assert not problems, problems
            else:
                assert len(problems) == 2 and all("768 B static + 49152 B dynamic" in p for p in problems), problems
        # Over the opt-in maximum fails as well; a kernel without a contract, or a stale contract, too.
        kernels = [dict(k, smem_bytes=200 * 1024) for k in result.kernels]
        assert len(compile_check.check_smem(kernels, contracts)) == 2
        assert len(compile_check.check_smem(result.kernels, {})) == 2
        stale = dict(contracts, gone_kernel=(0, False))
        assert compile_check.check_smem(result.kernels, stale) == [
            "shared-memory contract for gone_kernel, which no compiled kernel has"]


@needs_cxx
@pytest.mark.parametrize("opt_in", [False, True])
def test_emulation_enforces_the_dynamic_smem_limit(opt_in):
    """Under the CPU emulation a launch asking for more than 48 KiB of dynamic shared memory throws unless the
    kernel opted in with cudaFuncSetAttribute (which the emulation accepts), as the CUDA runtime fails it."""
    main = r"""
#include "row_sum.cu"
#include <cstdio>
#include <vector>
int main() {
  for (int n : {12288, 12289}) {
    std::vector<float> x(n, 1.0f);
    float out = 0.0f;
    try {
      twilight::row_sum(x.data(), &out, n);
      std::printf("%d ok %g\n", n, out);
    } catch (const std::exception& e) {
      std::printf("%d refused: %s\n", n, e.what());
    }
  }
}
"""
    with tempfile.TemporaryDirectory() as tmp:
        ok, out = compile_check.run_host_program(main, tmp, csrc=_row_kernel_dir(tmp, opt_in))
    assert ok, out
    lines = out.strip().splitlines()
    assert lines[0] == "12288 ok 12289", out  # 48 KiB: the sum of 12288 ones, plus the last one again
    if opt_in:
        assert lines[1] == "12289 ok 12290", out
    else:
        assert lines[1].startswith("12289 refused: launch asks for 49156 bytes of dynamic shared memory"), out


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
