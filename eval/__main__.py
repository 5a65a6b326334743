"""``python -m twilight_eval <task> ...`` -- the same as ``twilight eval <task> ...``."""
import sys

from .cli import main

sys.exit(main())
