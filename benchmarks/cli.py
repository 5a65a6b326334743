"""``twilight bench kernels|e2e``: the benchmarks' sub-commands for the ``twilight`` console command.

``twilight/cli.py`` registers them by importing ``add_bench_parser`` from the installed ``twilight_bench``
package (this folder, ``benchmarks/`` in the source tree). Each sub-command's options are those of
``twilight_bench.kernels.add_arguments`` / ``twilight_bench.e2e.add_arguments``; its ``func`` runs the benchmark
and returns the exit status 0.
"""
from __future__ import annotations

import argparse


def _runner(module_name: str):
    def func(args: argparse.Namespace) -> int:
        import importlib

        module = importlib.import_module(f"twilight_bench.{module_name}")
        ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func", "command", "bench")})
        module.run(ns)
        return 0

    return func


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``kernels`` and ``e2e``) to an ``add_subparsers()`` object; returns its parser."""
    from twilight_bench import e2e, kernels

    bench = subparsers.add_parser("bench", help="kernel microbenchmarks and end-to-end decode latency",
                                  description="Benchmarks; results go to benchmarks/results/<device>-<date>/.")
    sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, module in (("kernels", kernels), ("e2e", e2e)):
        doc = (module.__doc__ or "").strip().split("\n\n")[0]
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else name, description=doc,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=_runner(name))
    return bench
