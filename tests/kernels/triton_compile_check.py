"""Compile every Triton kernel for real GPU targets without a GPU (CI's check that they build for sm_80/sm_90a).

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not that Triton can compile them:
type mismatches of loop-carried values, unsupported constructs, shared-memory overflow only show up in the real
compiler. ``triton.compile`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) for an
explicit ``GPUTarget``, which needs no driver. Must run in a process without ``TRITON_INTERPRET=1``.

    python tests/kernels/triton_compile_check.py               # sm_90a and sm_80, prints a report

Test tooling (``tests/kernels/test_compile_checks.py`` runs it in a subprocess), not part of the library.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# (module, kernel, signature, constexprs, options): the variants the wrappers launch at Llama-3-8B's head shape
# (D=128, G=4 and 8, fp16/bf16) and at the row lengths that switch code paths.
_F16 = "*fp16"


def variants():
    v = []
    for dt, bdt in (("*fp16", "*fp16"), ("*bf16", "*bf16")):
        for g in (16,):  # BLOCK_G is max(16, next_pow2(G))
            v.append(("quest", "_quest_scores_kernel",
                      {"q_ptr": bdt, "bounds_ptr": bdt, "start_ptr": "*i32", "out_ptr": "*fp32", "P": "i32",
                       "H": "i32", "G": "i32", "bounds_row_stride": "i64", "page_size": "i32", "length": "i32"},
                      {"D": 128, "BLOCK_D": 128, "BLOCK_G": g, "BLOCK_P": 64, "DOT_F32": False}, {"num_warps": 4}))
        v.append(("spgemv", "_int4_spgemv_kernel",
                  {"q_ptr": dt, "packed_ptr": "*u8", "qparams_ptr": "*fp32", "idx_ptr": "*i32", "count_ptr": "*i32",
                   "out_ptr": "*fp32", "G": "i32", "K": "i32", "cap": "i32"},
                  {"D": 128, "BLOCK_D": 64, "BLOCK_G": 16, "BLOCK_N": 64, "DOT_F32": False}, {"num_warps": 4}))
        v.append(("attention", "_attn_chunk_kernel",
                  {"q_ptr": dt, "k_ptr": dt, "v_ptr": dt, "idx_ptr": "*i32", "count_ptr": "*i32", "out_ptr": dt,
                   "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "stride_kb": "i64", "stride_kh": "i64",
                   "stride_kn": "i64", "H": "i32", "G": "i32", "K": "i32", "n_chunks": "i32", "qk_scale": "fp32",
                   "CHUNK": "i32"},
                  {"D": 128, "BLOCK_D": 128, "BLOCK_G": 16, "BLOCK_N": 32, "DOT_F32": False}, {"num_warps": 4}))
        v.append(("attention", "_attn_merge_kernel",
                  {"count_ptr": "*i32", "out_ptr": dt, "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "G": "i32",
                   "n_chunks": "i32", "CHUNK": "i32"},
                  {"D": 128, "BLOCK_D": 128, "BLOCK_G": 16}, {"num_warps": 4}))
    v.append(("quest", "_block_select_kernel",
              {"scores_ptr": "*fp32", "start_ptr": "*i32", "key_ptr": "*i32", "first_ptr": "*i32", "cnt_ptr": "*i32",
               "P": "i32", "H": "i32", "n_cand": "i32", "k": "i32", "row_budget": "i32", "length": "i32",
               "page_size": "i32", "NB": "i32", "BPK": "i32"},
              {"BP": 1024, "FORCE_LAST": True}, {"num_warps": 4}))
    v.append(("quest", "_merge_expand_kernel",
              {"key_ptr": "*i32", "first_ptr": "*i32", "cnt_ptr": "*i32", "start_ptr": "*i32", "out_ptr": "*i32",
               "count_ptr": "*i32", "H": "i32", "k": "i32", "row_budget": "i32", "length": "i32",
               "page_size": "i32", "width": "i32", "NB": "i32", "BPK": "i32"},
              {"NB_P2": 8, "BLOCK": 256, "PS": 16, "EXPAND": 128, "FORCE_LAST": True}, {"num_warps": 4}))
    for single, block, warps in ((True, 8192, 16), (True, 1024, 4), (False, 2048, 8)):
        for has_len, row_p in ((False, False), (True, False), (True, True)):
            v.append(("top_p", "_top_p_threshold_kernel",
                      {"x_ptr": "*fp32", "stride_x": "i32", "len_ptr": "*i32", "p_ptr": "*fp32", "p_value": "fp32",
                       "scale": "fp32", "N": "i32", "G": "i32", "thr_ptr": "*i32", "max_ptr": "*fp32",
                       "kept_ptr": "*i32", "mask_ptr": "*i1", "stride_m": "i32", "hist_ptr": "*i64",
                       "fx_scale": "fp32"},
                      {"HAS_LEN": has_len, "WRITE_MASK": True, "ROW_P": row_p, "BLOCK": block, "SINGLE": single},
                      {"num_warps": warps, "enable_fp_fusion": False}))
    v.append(("top_p", "_union_compact_kernel",
              {"mask_ptr": "*i1", "idx_ptr": "*i32", "count_ptr": "*i32", "out_idx_ptr": "*i32",
               "out_count_ptr": "*i32", "G": "i32", "K": "i32"},
              {"BLOCK": 1024}, {"num_warps": 4}))
    return v


def _ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """``(registers, spill bytes)`` of a kernel's PTX, from Triton's bundled ptxas (``-v``); ``None`` if unknown."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    bin_dir = os.path.join(os.path.dirname(nvidia.__file__), "bin")
    out = ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        for name in ("ptxas-blackwell", "ptxas"):  # the first that accepts this PTX version
            ptxas = os.path.join(bin_dir, name)
            if not os.path.isfile(ptxas):
                continue
            proc = subprocess.run([ptxas, f"-arch={sm}", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                out = proc.stdout + proc.stderr
                break
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (int(regs.group(1)) if regs else None,
            int(spill.group(1)) + int(spill.group(2)) if spill else None)


def compile_all(archs=(90, 80), verbose=True) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the compile check without TRITON_INTERPRET=1 (the kernels must be JIT functions)")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for module, name, sig, constexprs, options in variants():
            fn = getattr(importlib.import_module(f"twilight.kernels.triton.{module}"), name)
            signature = dict(sig, **{k: "constexpr" for k in constexprs})
            t0 = time.perf_counter()
            row = {"arch": f"sm_{arch}", "kernel": f"{module}.{name}", "constexprs": constexprs}
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=target, options=options)
                regs, spill = _ptxas_report(compiled.asm["ptx"], arch)
                row.update(ok=True, shared_bytes=compiled.metadata.shared, registers=regs, spill_bytes=spill)
            except Exception as err:  # report every failure, not just the first
                row.update(ok=False, error=f"{type(err).__name__}: {err}")
            row["seconds"] = time.perf_counter() - t0
            results.append(row)
            if verbose:
                status = "ok  " if row["ok"] else "FAIL"
                extra = (f"smem {row['shared_bytes']:6d} B, {row['registers']} regs, {row['spill_bytes']} B spill"
                         if row["ok"] else row["error"].splitlines()[0][:200])
                print(f"{status} {row['arch']:6s} {row['kernel']:34s} {row['seconds']:5.1f} s  {extra}  {constexprs}")
                if not row["ok"]:
                    print(row["error"])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--allow-spills", action="store_true", help="do not fail on register spills")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch or (90, 80)))
    failed = [r for r in results if not r["ok"]]
    spilled = [r for r in results if r["ok"] and (r.get("spill_bytes") or 0) > 0]
    print(f"{len(results) - len(failed)}/{len(results)} kernel variants compiled; {len(spilled)} spill registers")
    return 1 if failed or (spilled and not args.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
