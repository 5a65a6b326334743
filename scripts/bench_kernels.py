#!/usr/bin/env python
"""Kernel microbenchmarks of Twilight's decode attention (same as ``twilight bench kernels``).

    python scripts/bench_kernels.py                      # CPU defaults: 4k,32k,128k, batch 1, fp32
    python scripts/bench_kernels.py --contexts 4k,32k --shapes llama3-8b --out /tmp/bench

See ``benchmarks/kernels.py`` and ``benchmarks/README.md``.
"""
import sys

from twilight_bench.kernels import main

if __name__ == "__main__":
    main(sys.argv[1:])
