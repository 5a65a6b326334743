#!/usr/bin/env bash
# RULER on the embedded SmolLM2-135M-Instruct at 4k and 8k, SAMPLES samples per task and length (default 4): dense
# against quest and quest-twilight at a budget of 1024 tokens, each under both GQA semantics (selector.gqa "group":
# 1024 tokens per kv-head, shared by its 3 query heads; "head": 1024 per query head, as the original Twilight code),
# twilight (top-p over every token) and streaming (1024 tokens), under the papers' decode-question protocol, on the 8
# needle tasks, vt and fwe (TASKS to change). One prefill per sample serves every config. Writes the configs,
# per-sample records, summary.json (paired differences against dense with bootstrap intervals), results.md and the
# plots to OUT (default benchmarks/results/ruler-smollm2-gqa); rerunning the same command resumes (about 2 hours on a
# 2-core CPU from scratch).
#   SAMPLES=4 bash scripts/ruler_table.sh
#   QA_DIR=dir-with-squad.json-and-hotpotqa.json TASKS="qa_1 qa_2" bash scripts/ruler_table.sh   # the QA tasks
# Extra arguments go to `twilight eval ruler` (e.g. --lengths 2048).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/ruler-smollm2-gqa}
SAMPLES=${SAMPLES:-4}
TASKS=${TASKS:-niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt fwe}
mkdir -p "$OUT/configs"
python - "$OUT/configs" <<'PY'
import json, sys
from twilight import TwilightConfig
from twilight_eval.selector_table import selector_config

for selector, budget, top_p, gqa, name in [("quest", 1024, None, "group", "quest-1024"),
                                           ("quest", 1024, None, "head", "quest-1024-head"),
                                           ("quest", 1024, 0.85, "group", "quest-twilight-1024"),
                                           ("quest", 1024, 0.85, "head", "quest-twilight-1024-head"),
                                           ("streaming", 1024, None, "group", "streaming-1024")]:
    cfg = selector_config(selector, budget, top_p)
    cfg = {**cfg, "selector": {**cfg["selector"], "gqa": gqa}, "name": name}
    TwilightConfig.load(cfg)  # validate before anything runs
    with open(f"{sys.argv[1]}/{name}.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
PY
C="$OUT/configs"
# shellcheck disable=SC2086  # TASKS is a list of words
twilight eval ruler --lengths 4096 8192 --samples "$SAMPLES" --tasks $TASKS --out "$OUT" ${QA_DIR:+--qa-dir "$QA_DIR"} \
    --configs dense "$C/quest-1024.json" "$C/quest-1024-head.json" "$C/quest-twilight-1024.json" \
    "$C/quest-twilight-1024-head.json" twilight "$C/streaming-1024.json" "$@"
