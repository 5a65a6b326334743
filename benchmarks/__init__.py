"""Benchmarks: kernel microbenchmarks and end-to-end decode latency.

- ``twilight_bench.kernels``: each stage (select, estimate, prune, attend) and the whole decode attention
  operator of one layer, against dense attention and Quest alone measured in the same run
  (``twilight bench kernels`` / ``scripts/bench_kernels.py``).
- ``twilight_bench.e2e``: per-token latency of ``model.generate()`` patched vs unpatched, and the cache's
  memory overhead (``twilight bench e2e`` / ``scripts/bench_e2e.py``).
- ``twilight_bench.profiles``: realistic attention for the pruner: a synthetic profile whose per-head
  top-p budgets match the embedded model's, and a replay of the embedded model's real q/k/v.
- ``twilight_bench.common``: timing (median and interquartile range, CUDA events on GPU), the environment
  record, memory-bandwidth peaks, output files.

Each module exposes ``add_arguments(parser)``, ``run(args)`` and ``main(argv=None)``; results go to
``benchmarks/results/<device>-<date>/`` as JSON, a Markdown table and a PNG plot.
"""
