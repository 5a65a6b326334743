"""Subprocess entry point for the tests: ``python _launch.py eval <task> ...`` == ``twilight eval ...``.

A script path rather than the console command, because ``accelerate launch`` needs one.
"""
import sys

from twilight.cli import main

sys.exit(main())
