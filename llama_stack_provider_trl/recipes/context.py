"""What a recipe gets from the scheduler, and the ways a job can end early.

No heavy imports here: the scheduler builds a JobContext before any recipe is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.models import TrainingProgress
from ..config import TrlPostTrainingConfig
from ..plan import TrainingPlan


# BaseException, not Exception: the scheduler may raise these inside library code (tokenizing a dataset,
# loading a model), and no library's `except Exception` may swallow them there.
class JobCancelled(BaseException):
    """The user cancelled the job."""


class JobInterrupted(BaseException):
    """The server is shutting down; a resumable checkpoint was saved where possible."""


@dataclass
class JobContext:
    job_uuid: str
    job_dir: Path
    request: dict[str, Any]
    config: TrlPostTrainingConfig
    plan: TrainingPlan
    report: Callable[..., None] = field(repr=False)
    """report(persist: bool, **fields): merge fields into the job's TrainingProgress/record."""
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    shutdown_requested: threading.Event = field(default_factory=threading.Event)
    resume_from: Path | None = None
    method: str = "dpo"
    preparing: bool = False
    """True from the job's start until training begins: cancel and shutdown then raise in the training thread."""
    preparing_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def training_begins(self) -> None:
        """From here on the trainer's callback stops the job, at a step boundary, with a checkpoint on shutdown."""
        with self.preparing_lock:
            self.preparing = False

    @property
    def checkpoints_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    @property
    def data_dir(self) -> Path:
        return self.job_dir / "data"

    def raise_if_stopped(self) -> None:
        """Between stages (loading, tokenizing) where the trainer's callback can't stop us."""
        if self.cancel_requested.is_set():
            raise JobCancelled()
        if self.shutdown_requested.is_set():
            raise JobInterrupted()


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint; trainer_state.json is written last, so a
    checkpoint cut short by a kill has none and is skipped."""
    if not checkpoints_dir.is_dir():
        return None
    complete = [p for p in checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


__all__ = ["JobContext", "JobCancelled", "JobInterrupted", "latest_checkpoint", "TrainingProgress"]
