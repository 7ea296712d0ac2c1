"""Where a job's processes run: `local` (worker processes on this machine) or `ray` (a Ray cluster)."""

from ..config import TrlPostTrainingConfig
from .base import Executor, Outcome, RunningJob
from .local import LocalExecutor


def make_executor(config: TrlPostTrainingConfig) -> Executor:
    """The provider's `executor`; ray is imported only when it is chosen."""
    if config.executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(config)
    return LocalExecutor(config)


__all__ = ["Executor", "LocalExecutor", "Outcome", "RunningJob", "make_executor"]
