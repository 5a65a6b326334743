"""The ``twilight`` console command: a dispatcher of sub-commands.

``twilight eval {passkey,ruler,longbench,ppl} ...`` is provided by the ``twilight_eval``
package (``eval/`` in the source tree). To add a command, write a function that takes the
sub-parsers object, adds a parser for the command and sets ``func`` (called with the parsed
arguments, returning the exit status), then list it in ``COMMANDS``::

    def _add_bench(subparsers):
        from twilight.bench.cli import add_bench_parser   # e.g. `twilight bench kernels|e2e`
        add_bench_parser(subparsers)

    COMMANDS = {"eval": _add_eval, "bench": _add_bench}
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence


def _import_twilight_eval():
    """``twilight_eval``, installed, or else straight from a source checkout's ``eval/``."""
    try:
        import twilight_eval
        return twilight_eval
    except ImportError:
        source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval", "__init__.py")
        if not os.path.isfile(source):
            raise
    spec = importlib.util.spec_from_file_location("twilight_eval", source,
                                                  submodule_search_locations=[os.path.dirname(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["twilight_eval"] = module
    spec.loader.exec_module(module)
    return module


def _add_eval(subparsers) -> None:
    _import_twilight_eval()
    from twilight_eval.cli import add_eval_parser
    add_eval_parser(subparsers)


def _add_bench(subparsers) -> None:
    from twilight.bench.cli import add_bench_parser
    add_bench_parser(subparsers)


# name -> function registering that sub-command on the sub-parsers object.
COMMANDS: dict[str, Callable] = {"eval": _add_eval, "bench": _add_bench}


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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
