#!/usr/bin/env bash
# One command for a machine with one GPU (H100/H200; no network; torch, triton and nvcc installed, FlashInfer
# maybe): everything the project needs measured there, in at most 8 minutes.
#
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run    # anywhere (CPU, CI): check the plan, run nothing heavy (< 1 min)
#
# Steps, each under its own time limit (`timeout`; a step that runs out is reported and the next one runs):
#   1. step    python -m pytest -m gpu             the no-host-sync decode step and CUDA-graph capture
#              tests/test_gpu_step.py              (tests/test_gpu_step.py) and count_ops on CUDA, first, so
#              tests/test_diagnostics.py           that a slow step 2 cannot crowd them out                  90 s
#   2. tests   python -m pytest -m gpu tests       every other test marked `gpu` (Triton kernels compiled for
#                                                  the GPU, the CUDA extension built with nvcc, FlashInfer,
#                                                  the patched models on CUDA, the benchmark harness; the
#                                                  autotuned Triton SpGEMV tunes once per shape)            210 s
#   3. kernels scripts/bench_kernels.py            one layer's decode operator at 32k, batch 1, 16, 64, fp16,
#                                                  Llama-3-8B heads, against the fastest dense baseline there
#                                                  (SDPA formulations, FlashInfer dense decode when installed),
#                                                  Quest alone, and ops / syncs / launches per step           90 s
#   4. e2e     scripts/bench_e2e.py                model.generate() per token, patched vs unpatched, with a
#                                                  Llama-3-8B-shaped random model in bf16 (8 of its 32 layers:
#                                                  every layer is the same, so the ratios are the full model's;
#                                                  LLAMA_LAYERS=32 for all of them) at 4k and 32k             80 s
# 470 s of limits, plus start-up and the summary: under 8 minutes (on an H200, 2026-11-30: step 49 s, tests
# 100 s before the SpGEMV autotuning and over 140 s with it, kernels 28 s, e2e 69 s). Limits can be changed with
# GPU_CHECK_TIMEOUT_{STEP,TESTS,KERNELS,E2E} (seconds); GPU_CHECK_STEPS=step,kernels (say) runs only those steps
# (a rerun after a fix; the files of the steps left out are kept from an earlier run into the same folder).
#
# Output: benchmarks/results/<gpu-name>-<date>/ (gpu name from nvidia-smi, else torch; lower case, every run of
# other characters turned into '-', as twilight_bench.common.device_slug does): kernels.{json,md,png},
# e2e.{json,md,png}, pytest-step.xml and pytest-gpu.xml (JUnit), logs/*.log (each step's output, the environment) and summary.md,
# the short summary also printed at the end. With $OUT set, the folder is also packed there as one
# <folder>.tar.gz beside a copy of summary.md (few files: a results channel may take only a handful).
# Commit that folder, then update benchmarks/README.md's tables.
#
# --dry-run: prints the plan, and checks in well under a minute on a CPU that every command would start:
# the option lists below are parsed by the benchmarks' own argparse parsers and validated (dtype, head shape,
# model names, sizes), and pytest collects the gpu tests (`--collect-only -m gpu`; tests/test_gpu_step.py
# must be among them). Nothing is written. CI runs it once, from scripts/test.sh after the main suite; it is not
# also a pytest test, which would make the suite collect itself a second time from inside itself.
#
# Where twilight is not pip-installed, the packages twilight_bench (benchmarks/) and twilight_eval (eval/) are
# made importable through symlinks in a temporary folder on PYTHONPATH: no pip, no network. Where only
# `python3` exists (no `python` on the PATH), a `python` link to it is put first on the PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if ! command -v python >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
    PY_SHIM=$(mktemp -d)
    ln -s "$(command -v python3)" "$PY_SHIM/python"
    export PATH="$PY_SHIM:$PATH"
fi

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

T_STEP=${GPU_CHECK_TIMEOUT_STEP:-90}
T_TESTS=${GPU_CHECK_TIMEOUT_TESTS:-210}
T_KERNELS=${GPU_CHECK_TIMEOUT_KERNELS:-90}
T_E2E=${GPU_CHECK_TIMEOUT_E2E:-80}
T_DRY=90
STEPS_LIST=${GPU_CHECK_STEPS:-step,tests,kernels,e2e}
STEPS_WANTED=",$STEPS_LIST,"
for s in ${STEPS_LIST//,/ }; do
    case "$s" in step|tests|kernels|e2e) ;; *) echo "GPU_CHECK_STEPS: unknown step $s (use step, tests, kernels, e2e)" >&2; exit 2 ;; esac
done
wanted() { [[ "$STEPS_WANTED" == *",$1,"* ]]; }
LLAMA_LAYERS=${LLAMA_LAYERS:-8}

# ------------------------------------------------------------------------------------------- the commands
PYTEST_ARGS=(-m gpu -p no:cacheprovider -q -ra --continue-on-collection-errors)
FIRST_TESTS=(tests/test_gpu_step.py tests/test_diagnostics.py)
OTHER_TESTS=(tests --ignore=tests/test_gpu_step.py --ignore=tests/test_diagnostics.py)
KERNEL_ARGS=(--device cuda --contexts 32k --batches 1,16,64 --dtypes fp16 --shapes llama3-8b --backend auto
             --repeats 10 --min-repeats 5 --warmup 3 --max-seconds 8 --bandwidth-mib 1024)
E2E_ARGS=(--device cuda --models llama3-8b-random --dtype bf16 --contexts 4k,32k --llama-layers "$LLAMA_LAYERS"
          --new-tokens 16 --rounds 2 --backend auto)

# ------------------------------------------------------------------------------------------- helpers
gpu_name() {
    local name=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    fi
    if [ -z "$name" ]; then
        name=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
               2>/dev/null)
    fi
    echo "${name:-no-gpu}"
}

slug() {  # as twilight_bench.common.device_slug
    echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//' | cut -c1-60
}

ensure_importable() {  # twilight from the tree; twilight_bench and twilight_eval via symlinks when not installed
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if ! python -c "import twilight_bench, twilight_eval" >/dev/null 2>&1; then
        local shim
        shim=$(mktemp -d)
        ln -s "$ROOT/benchmarks" "$shim/twilight_bench"
        ln -s "$ROOT/eval" "$shim/twilight_eval"
        export PYTHONPATH="$shim:$PYTHONPATH"
        echo "twilight_bench/twilight_eval not installed: importing them from the tree ($shim)"
    fi
}

declare -a STEP_LINES=()
run_step() {  # run_step NAME LIMIT LOG CMD...: the command under `timeout`, output to LOG and the terminal
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== [$name] (limit ${limit}s) $*"
    local t0=$SECONDS rc
    # SIGINT first so that pytest still writes its report; KILL 15 s later
    if [ "${QUIET_STEP:-0}" -eq 1 ]; then  # output to the log only; its last lines shown
        timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1
        rc=$?
        tail -n 3 "$log"
    else
        timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    local took=$((SECONDS - t0))
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="TIMED OUT after ${limit}s"; elif [ "$rc" -ne 0 ]; then what="failed (exit $rc)"; fi
    STEP_LINES+=("$name: $what, ${took}s")
    echo "== [$name] $what in ${took}s"
    return "$rc"
}

print_plan() {
    echo "plan (results in $1):"
    echo "  1. step    (${T_STEP}s)   python -m pytest ${PYTEST_ARGS[*]} ${FIRST_TESTS[*]} --junitxml=$1/pytest-step.xml"
    echo "  2. tests   (${T_TESTS}s)   python -m pytest ${PYTEST_ARGS[*]} ${OTHER_TESTS[*]} --junitxml=$1/pytest-gpu.xml"
    echo "  3. kernels (${T_KERNELS}s)   python scripts/bench_kernels.py ${KERNEL_ARGS[*]} --out $1"
    echo "  4. e2e     (${T_E2E}s)   python scripts/bench_e2e.py ${E2E_ARGS[*]} --out $1"
    echo "  then: summary.md; logs in $1/logs; copied to \$OUT when set"
}

ensure_importable
NAME=$(gpu_name)
DIR="benchmarks/results/$(slug "$NAME")-$(date +%Y-%m-%d)"

# ------------------------------------------------------------------------------------------- dry run
if [ "$DRY_RUN" -eq 1 ]; then
    echo "gpu_check.sh --dry-run: device '$NAME'; nothing is written"
    print_plan "$DIR"
    command -v timeout >/dev/null || { echo "FAIL: 'timeout' (coreutils) is missing"; exit 1; }
    fail=0
    # The option lists, parsed by the scripts' own parsers and validated as the benchmarks do before running.
    run_step "options" "$T_DRY" /dev/null python - "${KERNEL_ARGS[@]}" :: "${E2E_ARGS[@]}" <<'EOF' || fail=1
import argparse
import sys

from twilight_bench import common, e2e, kernels

argv = sys.argv[1:]
cut = argv.index("::")
k_argv, e_argv = argv[:cut], argv[cut + 1:]
kp = kernels.add_arguments(argparse.ArgumentParser(prog="bench_kernels"))
k = kernels._defaults(kp.parse_args(k_argv + ["--out", "/nonexistent"]))  # checks dtypes and head shapes
assert k.device == "cuda" and k.contexts == [32768] and k.batches == [1, 16, 64] and k.dtypes == ["fp16"], k
for name in ("quest", "quest-twilight", "twilight"):
    kernels.variant_config(name, k)  # the backend name and budgets make a valid config
ep = e2e.add_arguments(argparse.ArgumentParser(prog="bench_e2e"))
e = ep.parse_args(e_argv + ["--out", "/nonexistent"])
bad = [m for m in common.parse_list(e.models) if m not in e2e.MODELS]
assert not bad, f"unknown e2e models {bad}"
assert e.dtype in common.DTYPES, e.dtype
assert common.parse_sizes(e.contexts) and e.new_tokens >= 3 and e.llama_layers >= 1
bad = [v for v in common.parse_list(e.variants) if v not in e2e.ALL_UNPATCHED + e2e.ALL_PATCHED]
assert not bad, f"unknown e2e variants {bad}"
print(f"kernels: contexts {k.contexts}, batches {k.batches}, dtypes {k.dtypes}, shapes {k.shapes}, "
      f"backend {k.backend}, repeats {k.repeats}")
print(f"e2e: models {e.models}, dtype {e.dtype}, contexts {e.contexts}, layers {e.llama_layers}, "
      f"new tokens {e.new_tokens}, rounds {e.rounds}")
EOF
    collect_log=$(mktemp)
    QUIET_STEP=1 run_step "collect gpu tests" "$T_DRY" "$collect_log" \
        python -m pytest --collect-only -q -m gpu -p no:cacheprovider tests || fail=1
    n_gpu=$(grep -c "::" "$collect_log" || true)
    n_step=$(grep -c "^tests/test_gpu_step.py::" "$collect_log" || true)
    rm -f "$collect_log"
    echo "collected $n_gpu gpu tests ($n_step in tests/test_gpu_step.py)"
    if [ "$n_step" -eq 0 ]; then echo "FAIL: tests/test_gpu_step.py has no gpu test collected"; fail=1; fi
    printf '  %s\n' "${STEP_LINES[@]}"
    if [ "$fail" -ne 0 ]; then echo "gpu_check.sh --dry-run: FAILED"; exit 1; fi
    echo "gpu_check.sh --dry-run: ok"
    exit 0
fi

# ------------------------------------------------------------------------------------------- the real run
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run to check the plan on a CPU)" >&2
    exit 1
fi
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
mkdir -p "$DIR/logs"
START=$SECONDS
echo "gpu_check.sh: $NAME; writing to $DIR"
print_plan "$DIR"
{
    date -Is
    nvidia-smi 2>&1 || true
    command -v nvcc >/dev/null && nvcc --version
    python - <<'EOF'
import importlib
import sys

import torch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for m in ("triton", "flashinfer", "transformers", "twilight"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "unavailable:", type(e).__name__, e)
EOF
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -n 40
} > "$DIR/logs/env.log" 2>&1

wanted step && run_step step "$T_STEP" "$DIR/logs/pytest-step.log" \
    python -m pytest "${PYTEST_ARGS[@]}" "${FIRST_TESTS[@]}" --junitxml="$DIR/pytest-step.xml"
wanted tests && run_step tests "$T_TESTS" "$DIR/logs/pytest-gpu.log" \
    python -m pytest "${PYTEST_ARGS[@]}" "${OTHER_TESTS[@]}" --junitxml="$DIR/pytest-gpu.xml"
wanted kernels && run_step kernels "$T_KERNELS" "$DIR/logs/kernels.log" \
    python scripts/bench_kernels.py "${KERNEL_ARGS[@]}" --out "$DIR"
wanted e2e && run_step e2e "$T_E2E" "$DIR/logs/e2e.log" \
    python scripts/bench_e2e.py "${E2E_ARGS[@]}" --out "$DIR"

STEPS=$(printf '%s\n' "${STEP_LINES[@]}")
STEPS="$STEPS" TOTAL=$((SECONDS - START)) GPU="$NAME" python - "$DIR" <<'EOF' | tee "$DIR/summary.md"
import json
import os
import sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
print(f"# GPU check: {os.environ['GPU']}, {out}\n")
print("Steps (" + os.environ["TOTAL"] + " s in all):\n")
for line in os.environ["STEPS"].splitlines():
    print(f"- {line}")
print()


def load(name):
    try:
        with open(os.path.join(out, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


for xml, label in (("pytest-step.xml", "decode-step tests (tests/test_gpu_step.py, tests/test_diagnostics.py)"),
                   ("pytest-gpu.xml", "other gpu tests")):
    try:
        root = ET.parse(os.path.join(out, xml)).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"**{label}**: no report ({e})\n")
        continue
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    print(f"**{label}**: {tot['tests']} run, {tot['failures']} failed, {tot['errors']} errors, "
          f"{tot['skipped']} skipped")
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").strip().splitlines()
            print(f"- FAILED {case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
    print()

k = load("kernels.json")
if k:
    print("**kernels** (one layer, ms per decode step, median; QT = quest-twilight):\n")
    print("| shape | dtype | B | ctx | dense baseline | flashinfer | quest | QT | QT/dense | QT/flashinfer | QT/quest "
          "| QT ops / syncs / launches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in k["rows"]:
        if "times" not in r:
            print(f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['context']} | "
                  f"skipped: {r['skipped'].get('all')} |")
            continue
        t, sp = r["times"], r["speedup"]["quest-twilight"]
        fi = [t[n]["median_ms"] for n in ("flashinfer-dense", "flashinfer-dense-tc") if n in t]
        ops = (r.get("ops_per_step") or {}).get("quest-twilight")
        cells = [r["shape"], r["dtype"], r["batch"], r["context"], f"{t[r['dense_baseline']]['median_ms']:.3f} ({r['dense_baseline']})",
                 f"{min(fi):.3f}" if fi else "—", f"{t['quest']['median_ms']:.3f}",
                 f"{t['quest-twilight']['median_ms']:.3f}", f"{sp['vs_dense']:.2f}x",
                 f"{sp['vs_flashinfer']:.2f}x" if "vs_flashinfer" in sp else "—", f"{sp['vs_quest']:.2f}x",
                 f"{ops['ops']} / {ops['syncs']} / {ops['launches']}" if ops else "—"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for g in k.get("goals", []):
        print(f"- goal: {g['goal']}: {g['met']} ({g['note']})")
    print()
else:
    print("**kernels**: no kernels.json (see logs/kernels.log)\n")

e = load("e2e.json")
if e:
    print("**e2e** (ms per generated token, median):\n")
    for r in e["rows"]:
        ms = {v: run["per_token"]["median_ms"] for v, run in r["runs"].items()}
        qt = r["speedup"].get("quest-twilight", {})
        print(f"- {r['model']} ({r['layers']} layers, {r['dtype']}), context {r['context']}: "
              + ", ".join(f"{v} {m:.2f}" for v, m in ms.items())
              + (f"; quest-twilight {qt['vs_best_unpatched']:.2f}x vs {r['best_unpatched']}"
                 if "vs_best_unpatched" in qt else ""))
else:
    print("**e2e**: no e2e.json (see logs/e2e.log)")
EOF

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && tar -czf "$OUT/$(basename "$DIR").tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")" \
        && cp "$DIR/summary.md" "$OUT/summary.md" && echo "packed into $OUT/$(basename "$DIR").tar.gz"
fi
echo "gpu_check.sh: done in $((SECONDS - START))s; results in $DIR"
failed=$(printf '%s\n' "${STEP_LINES[@]}" | grep -vc ": ok," || true)
[ "$failed" -eq 0 ]
