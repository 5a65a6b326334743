"""The registry of ``twilight eval`` tasks: name -> :class:`~twilight_eval.tasks.base.Task` subclass.

To add a task, write a ``Task`` subclass (see ``base.py`` and ``passkey.py`` for a small
example) and add it to ``TASKS`` below; the CLI picks it up as ``twilight eval <name>``.
"""
from ..ppl import PerplexityTask
from .base import Task
from .longbench import LongBenchTask
from .longbench_v2 import LongBenchV2Task
from .passkey import PasskeyTask
from .ruler import RulerTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (PasskeyTask, RulerTask, LongBenchTask, LongBenchV2Task,
                                                    PerplexityTask)}

__all__ = ["TASKS", "Task"]
