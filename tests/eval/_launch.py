"""Subprocess entry point for the tests: ``python _launch.py eval <task> ...`` == ``twilight eval ...``.

Works whether or not the project is installed (``accelerate launch`` needs a script path).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twilight.cli import main  # noqa: E402

sys.exit(main())
