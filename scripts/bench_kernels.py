#!/usr/bin/env python
"""Kernel microbenchmarks of Twilight's decode attention (same as ``twilight bench kernels``).

    python scripts/bench_kernels.py                      # CPU defaults: 4k,32k,128k, batch 1, fp32
    python scripts/bench_kernels.py --contexts 4k,32k --shapes llama3-8b --out /tmp/bench

See ``twilight/bench/kernels.py`` and ``benchmarks/README.md``.
"""
import os
import sys

try:
    from twilight.bench.kernels import main
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from twilight.bench.kernels import main

if __name__ == "__main__":
    main(sys.argv[1:])
