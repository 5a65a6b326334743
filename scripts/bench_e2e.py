#!/usr/bin/env python
"""End-to-end ``model.generate()`` decode latency, patched vs unpatched (same as ``twilight bench e2e``).

    python scripts/bench_e2e.py                          # SmolLM2 at 1k,4k; Llama-3-8B-shaped (2 layers) at 4k,16k
    python scripts/bench_e2e.py --models smollm2 --contexts 2k --new-tokens 16

See ``benchmarks/e2e.py`` and ``benchmarks/README.md``.
"""
import sys

from twilight_bench.e2e import main

if __name__ == "__main__":
    main(sys.argv[1:])
