"""Where a job's processes run: `local` (worker processes on this machine)."""

from .base import Executor, Outcome, RunningJob
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "Outcome", "RunningJob"]
