"""What a recipe gets from its worker process, and how a job stops early.

A recipe runs in each of a job's processes (ranks). Rank 0 reports progress and writes
the artifacts; every rank trains. Cancel needs no help from the recipe: the server kills
the job's processes. A shutdown asks for a resumable checkpoint: the server makes the
job's stop file, and the trainer's callback saves and stops at the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrlPostTrainingConfig
from ..plan import TrainingPlan


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
    """report(persist: bool, **fields): merge fields into the job's TrainingProgress/record (rank 0 only)."""
    stop_requested: Callable[[], bool] = field(default=lambda: False, repr=False)
    """Whether the server asked for a checkpoint and a stop (a shutdown); cheap enough to ask every step."""
    resume_from: Path | None = None
    method: str = "dpo"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoints_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    @property
    def data_dir(self) -> Path:
        return self.job_dir / "data"

    def raise_if_stopped(self) -> None:
        """Between stages (loading, tokenizing) where the trainer's callback can't stop us."""
        if self.stop_requested():
            raise JobInterrupted()


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint; trainer_state.json is written last, so a
    checkpoint cut short by a kill has none and is skipped."""
    if not checkpoints_dir.is_dir():
        return None
    complete = [p for p in checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


__all__ = ["JobContext", "JobInterrupted", "latest_checkpoint"]
