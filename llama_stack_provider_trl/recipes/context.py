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


class JobCancelled(Exception):
    """The user cancelled the job."""


class JobInterrupted(Exception):
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
