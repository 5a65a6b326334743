"""Compile ``csrc/`` with ``nvcc`` for the GPUs we target, without needing a GPU (CI's compile check).

Each ``.cu`` is compiled once for ``sm_80`` (A100) and ``sm_90a`` (H100) with the same standard and flags the
JIT build uses, and ptxas' per-kernel report is collected (registers, spills, static shared memory); the torch
bindings (``bindings.cpp``, CUDA variant) are syntax-checked with the host compiler against torch's headers.

Shared memory: a launch fails when a block's static + dynamic shared memory exceeds 48 KiB, unless the kernel
opted in (``cudaFuncSetAttribute(..., cudaFuncAttributeMaxDynamicSharedMemorySize, ...)``), which raises the limit
to the architecture's maximum (227 KiB on sm_90, 163 KiB on sm_80). Every kernel declares, next to its launcher,
the largest dynamic size that launcher can request and whether it opts in (``TW_SMEM_CONTRACT`` in
``csrc/twilight_cuda.cuh``); `smem_contracts` reads those declarations by compiling the source for the host (the
CPU emulation's build) and running the registry, and `check_smem` adds ptxas' static figure to each and compares.

    python tests/kernels/cuda_compile_check.py               # prints a report, exit status 1 on failure
    python tests/kernels/cuda_compile_check.py --no-bindings

Test tooling (``tests/kernels/test_compile_checks.py`` runs it), not part of the library. The sources are those the
cuda backend builds: ``twilight.kernels.jit.csrc_dir()``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from twilight.kernels.jit import csrc_dir

ARCHS = ("80", "90a")
CU_SOURCES = ("top_p.cu", "int4_spgemv.cu")

#: Shared memory a block may use (static + dynamic): without opting in, and the opt-in maximum per architecture
#: (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB on H100/H200, 163 KiB on A100).
DEFAULT_SMEM_LIMIT = 48 * 1024
OPT_IN_SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_90a": 227 * 1024}


def find_nvcc() -> str | None:
    """``nvcc`` from PATH, ``$CUDA_HOME/bin`` or ``/usr/local/cuda/bin``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_include(nvcc: str) -> Path | None:
    """The CUDA toolkit's include directory (the one holding ``cuda_runtime.h``)."""
    candidates = [Path(os.path.realpath(nvcc)).parent.parent / "include"]
    candidates += [Path(h) / "include" for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    candidates += [Path("/usr/local/cuda/include")]
    return next((c for c in candidates if (c / "cuda_runtime.h").is_file()), None)


def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return list(include_paths())


def find_cxx() -> str | None:
    """The host C++ compiler: ``$CXX``, else ``c++``/``g++``/``clang++`` from PATH."""
    return os.environ.get("CXX") or next(
        (found for c in ("c++", "g++", "clang++") if (found := shutil.which(c))), None)


@dataclass
class CompileResult:
    source: str
    ok: bool
    seconds: float
    command: list[str]
    output: str
    # ptxas, one entry per kernel and architecture: {"arch", "kernel" (mangled), "registers", "spill_bytes",
    # "smem_bytes" (static shared memory)}
    kernels: list[dict] = field(default_factory=list)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_ptxas(text: str) -> list[dict]:
    kernels, current = [], None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_bytes": 0,
                       "smem_bytes": 0}
            kernels.append(current)
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
            if sm := _PTXAS_SMEM.search(line):  # ptxas leaves it out when the kernel has none
                current["smem_bytes"] = int(sm.group(1))
    return kernels


def compile_cu(source: str, nvcc: str, out_dir: str, archs=ARCHS, csrc: Path | None = None) -> CompileResult:
    """``nvcc -c`` one file of ``csrc`` (default ``csrc_dir()``) for ``archs``; the object goes to ``out_dir``."""
    csrc = Path(csrc) if csrc is not None else csrc_dir()
    src = csrc / source
    cmd = [nvcc, "-c", str(src), "-o", str(Path(out_dir) / (src.stem + ".o")), "-std=c++20", "-O3", "-lineinfo",
           "-Xptxas", "-v", f"-I{csrc}"] + [f"-I{p}" for p in _torch_includes()]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    return CompileResult(source, proc.returncode == 0, time.perf_counter() - t0, cmd, out, _parse_ptxas(out))


def run_host_program(code: str, out_dir: str, csrc: Path | None = None, cxx: str | None = None) -> tuple[bool, str]:
    """Build ``code`` (C++ that may include ``csrc`` files) with the host compiler against the CPU emulation
    (``-DTWILIGHT_CUDA_EMULATE``) and run it: ``(ok, compiler output + program output)``."""
    csrc = Path(csrc) if csrc is not None else csrc_dir()
    cxx = cxx or find_cxx()
    if cxx is None:
        return False, "no host C++ compiler (CXX, c++, g++, clang++)"
    main = Path(out_dir) / "host_main.cpp"
    exe = Path(out_dir) / "host_main"
    main.write_text(code)
    build = subprocess.run([cxx, "-std=c++20", "-O0", "-DTWILIGHT_CUDA_EMULATE", f"-I{csrc}", str(main), "-o",
                            str(exe)], capture_output=True, text=True)
    if build.returncode != 0:
        return False, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    return run.returncode == 0, run.stdout + run.stderr


def smem_contracts(source: str, out_dir: str, csrc: Path | None = None, cxx: str | None = None) -> dict:
    """The shared-memory contracts ``source`` declares (``TW_SMEM_CONTRACT``): ``{kernel name: (max dynamic
    bytes, opt_in)}``, read by compiling the source for the host and running its registry."""
    code = (f'#include "{source}"\n#include <cstdio>\n'
            "int main() {\n"
            "  for (const auto& c : twilight::smem_contracts())\n"
            '    std::printf("%s %zu %d\\n", c.kernel, c.max_dynamic_bytes, c.opt_in ? 1 : 0);\n'
            "}\n")
    ok, out = run_host_program(code, out_dir, csrc, cxx)
    if not ok:
        raise RuntimeError(f"reading the shared-memory contracts of {source} failed:\n{out}")
    contracts = {}
    for line in out.split("\n"):
        if line.strip():
            name, dynamic, opt_in = line.split()
            if name in contracts:
                raise RuntimeError(f"{source}: two shared-memory contracts for {name}")
            contracts[name] = (int(dynamic), opt_in == "1")
    return contracts


def check_smem(kernels: list[dict], contracts: dict) -> list[str]:
    """Problems with the shared memory of ptxas' ``kernels`` (`CompileResult.kernels`) under ``contracts``
    (`smem_contracts`): a kernel without a contract, a contract matching no kernel, or static + the largest
    dynamic request over the limit (48 KiB, or the architecture's opt-in maximum for an opted-in kernel)."""
    problems, used = [], set()
    for k in kernels:
        # An identifier appears in the mangled name as <length><name>.
        names = [n for n in contracts if f"{len(n)}{n}" in k["kernel"]]
        if len(names) != 1:
            problems.append(f"{k['arch']} {k['kernel']}: {'no' if not names else 'more than one'} shared-memory "
                            f"contract (TW_SMEM_CONTRACT) matches it: {names}")
            continue
        name = names[0]
        used.add(name)
        dynamic, opt_in = contracts[name]
        limit = OPT_IN_SMEM_LIMIT.get(k["arch"], DEFAULT_SMEM_LIMIT) if opt_in else DEFAULT_SMEM_LIMIT
        total = k["smem_bytes"] + dynamic
        if total > limit:
            problems.append(f"{k['arch']} {name}: {k['smem_bytes']} B static + {dynamic} B dynamic = {total} B of "
                            f"shared memory > the {limit} B a block may have"
                            + ("" if opt_in else " without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize)"))
    problems += [f"shared-memory contract for {n}, which no compiled kernel has" for n in contracts if n not in used]
    return problems


def check_bindings(nvcc: str | None, out_dir: str) -> CompileResult:
    """Syntax-check the CUDA variant of ``bindings.cpp`` with the host C++ compiler and torch's headers.

    A CPU-only torch wheel lacks the generated ``c10/cuda/impl/cuda_cmake_macros.h``; a stand-in is provided
    (it only defines ``C10_CUDA_BUILD_SHARED_LIBS``, as CUDA wheels do).
    """
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    stub = Path(out_dir) / "stub"
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in _torch_includes()):
        (stub / "c10/cuda/impl").mkdir(parents=True, exist_ok=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=twilight_cuda_kernels",
           f"-I{csrc_dir()}", f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in _torch_includes()]
    cmd += [f"-I{stub}"]
    cuda_include = _cuda_include(nvcc) if nvcc else None
    if cuda_include is not None:
        cmd += [f"-I{cuda_include}"]
    cmd += [str(csrc_dir() / "bindings.cpp")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return CompileResult("bindings.cpp", proc.returncode == 0, time.perf_counter() - t0, cmd,
                         proc.stdout + proc.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-bindings", action="store_true", help="skip the host-compiler check of bindings.cpp")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): nothing compiled")
        return 1
    print(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        results = [compile_cu(s, nvcc, tmp) for s in CU_SOURCES]
        problems = []
        for r in results:
            if r.ok:
                problems += check_smem(r.kernels, smem_contracts(r.source, tmp))
        if not args.no_bindings:
            results.append(check_bindings(nvcc, tmp))
        for r in results:
            ok &= r.ok
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.source:16s} {r.seconds:6.1f} s")
            for k in r.kernels:
                print(f"       {k['arch']:7s} {k['registers']:>4} regs {k['spill_bytes']:>5} B spill "
                      f"{k['smem_bytes']:>6} B static smem  {k['kernel']}")
            if not r.ok:
                print(r.output)
        for problem in problems:
            print(f"FAIL shared memory: {problem}")
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
