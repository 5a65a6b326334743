"""The ``twilight`` console command: a dispatcher of sub-commands.

``twilight eval {passkey,ruler,longbench,longbench-v2,ppl} ...`` comes from the ``twilight_eval`` package
(``eval/`` in the source tree) and ``twilight bench {kernels,e2e} ...`` from ``twilight_bench`` (``benchmarks/``);
both are installed beside the library by ``pip install .``. ``twilight lm-eval ARGS`` is lm-evaluation-harness's
``lm_eval ARGS`` with ``--model twilight`` registered (``twilight.integrations.lm_eval``). A command whose
package or dependencies cannot be imported is listed as unavailable, with the import error, and the others still
work. To add a command, write a function that takes the sub-parsers object, adds a parser for the command and
sets ``func`` (called with the parsed arguments, returning the exit status), then list it in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _add_eval(subparsers) -> None:
    from twilight_eval.cli import add_eval_parser
    add_eval_parser(subparsers)


def _add_bench(subparsers) -> None:
    from twilight_bench.cli import add_bench_parser
    add_bench_parser(subparsers)


def _add_lm_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "lm-eval", add_help=False, help="lm-evaluation-harness with --model twilight registered (lm_eval's own "
                                        "arguments; pip install 'twilight[lm-eval]')")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: _run_lm_eval(args.rest))


def _run_lm_eval(rest: Sequence[str]) -> int:
    """``lm_eval <rest>`` with ``--model twilight`` registered (``twilight.integrations.lm_eval.main``).

    ``main`` hands every argument after ``lm-eval`` over untouched (argparse would claim options such as
    ``--model`` for itself)."""
    try:
        from twilight.integrations.lm_eval import main as lm_eval_main
    except ImportError as err:   # lm-eval is an optional dependency
        print(f"twilight lm-eval: error: needs lm-eval ({err}); pip install 'twilight[lm-eval]'", file=sys.stderr)
        return 2
    return lm_eval_main(list(rest))


# name -> function registering that sub-command on the sub-parsers object.
COMMANDS: dict[str, Callable] = {"eval": _add_eval, "bench": _add_bench, "lm-eval": _add_lm_eval}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twilight", description="Twilight: adaptive sparse attention "
                                     "for long-context decoding (evaluations and benchmarks).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, register in COMMANDS.items():
        try:
            register(subparsers)
        except ImportError as err:   # a command whose dependencies are missing must not break the others
            unavailable = subparsers.add_parser(name, help=f"(unavailable: {err})", add_help=False)
            unavailable.add_argument("rest", nargs=argparse.REMAINDER)
            unavailable.set_defaults(func=lambda args, name=name, err=err: _unavailable(name, err))
    return parser


def _unavailable(name: str, err: ImportError) -> int:
    print(f"twilight {name}: error: unavailable, {err}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return _run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
