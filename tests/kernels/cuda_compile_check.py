"""Compile ``csrc/`` with ``nvcc`` for the GPUs we target, without needing a GPU (CI's compile check).

Each ``.cu`` is compiled once for ``sm_80`` (A100) and ``sm_90a`` (H100) with the same standard and flags the
JIT build uses, and ptxas' per-kernel register / spill report is collected; the torch bindings
(``bindings.cpp``, CUDA variant) are syntax-checked with the host compiler against torch's headers.

    python tests/kernels/cuda_compile_check.py               # prints a report, exit status 1 on failure
    python tests/kernels/cuda_compile_check.py --no-bindings

Test tooling (``tests/kernels/test_compile_checks.py`` runs it), not part of the library. The sources are those the
cuda backend builds: ``twilight.kernels.cuda.csrc_dir()``.
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

from twilight.kernels.cuda import csrc_dir

ARCHS = ("80", "90a")
CU_SOURCES = ("top_p.cu", "int4_spgemv.cu")


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


@dataclass
class CompileResult:
    source: str
    ok: bool
    seconds: float
    command: list[str]
    output: str
    kernels: list[dict] = field(default_factory=list)  # ptxas: {"arch", "kernel", "registers", "spill_bytes"}


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(text: str) -> list[dict]:
    kernels, current = [], None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_bytes": 0}
            kernels.append(current)
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
    return kernels


def compile_cu(source: str, nvcc: str, out_dir: str, archs=ARCHS) -> CompileResult:
    """``nvcc -c`` one ``csrc/`` file for ``archs``; the object goes to ``out_dir``."""
    src = csrc_dir() / source
    cmd = [nvcc, "-c", str(src), "-o", str(Path(out_dir) / (src.stem + ".o")), "-std=c++20", "-O3", "-lineinfo",
           "-Xptxas", "-v", f"-I{csrc_dir()}"] + [f"-I{p}" for p in _torch_includes()]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    return CompileResult(source, proc.returncode == 0, time.perf_counter() - t0, cmd, out, _parse_ptxas(out))


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
        if not args.no_bindings:
            results.append(check_bindings(nvcc, tmp))
        for r in results:
            ok &= r.ok
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.source:16s} {r.seconds:6.1f} s")
            for k in r.kernels:
                print(f"       {k['arch']:7s} {k['registers']:>4} regs {k['spill_bytes']:>5} B spill  {k['kernel']}")
            if not r.ok:
                print(r.output)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
