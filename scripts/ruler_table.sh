#!/usr/bin/env bash
# RULER's 13 tasks on the embedded SmolLM2-135M-Instruct at 2k/4k/8k: dense against quest and quest-twilight at
# a budget of 1024 tokens per kv-head, twilight (top-p over every token) and streaming (1024 tokens), under the papers'
# decode-question protocol. Writes the configs, per-sample records, summary.json, results.md and the plots to
# OUT (default benchmarks/results/ruler-smollm2); rerunning the same command resumes (the committed records predate
# run keys: a rerun sets them aside and computes every pair again).
#   QA_DIR=dir-with-squad.json-and-hotpotqa.json bash scripts/ruler_table.sh   # qa_1/qa_2 from local files
# Without QA_DIR the QA tasks load through `datasets` or are skipped (offline), and the summary notes it.
# Extra arguments go to `twilight eval ruler` (e.g. --samples 2, --lengths 2048).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/ruler-smollm2}
mkdir -p "$OUT/configs"
python - "$OUT/configs" <<'EOF'
import json, sys
from twilight import TwilightConfig
from twilight_eval.selector_table import selector_config

for selector, budget, top_p, name in [("quest", 1024, None, "quest-1024"),
                                     ("quest", 1024, 0.85, "quest-twilight-1024"),
                                     ("streaming", 1024, None, "streaming-1024")]:
    cfg = {**selector_config(selector, budget, top_p), "name": name}
    TwilightConfig.load(cfg)
    with open(f"{sys.argv[1]}/{name}.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
EOF
C="$OUT/configs"
twilight eval ruler --lengths 2048 4096 8192 --samples 1 --out "$OUT" ${QA_DIR:+--qa-dir "$QA_DIR"} \
    --configs dense "$C/quest-1024.json" "$C/quest-twilight-1024.json" twilight "$C/streaming-1024.json" "$@"
