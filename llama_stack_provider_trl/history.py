"""A job's metrics history: every logged step, kept beside its artifacts.

Status shows only the latest metrics; curves, results files and metrics events need all of them.
Rank 0's trainer callback appends one JSON line per Trainer log call to ``<job_dir>/metrics.jsonl``
(train logs and eval logs of one step come as separate calls). The file is append-only, so a
reader (the server, while the job trains) never sees a half-rewritten file: at worst a last line
still being written, which it skips.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

FILE_NAME = "metrics.jsonl"


def path(job_dir: Path) -> Path:
    return job_dir / FILE_NAME


def append(job_dir: Path, step: int, logs: dict[str, Any], total_steps: int | None = None,
           epoch: float | None = None) -> None:
    """Record one Trainer log call: its finite numbers under TRL's own names (loss, eval_loss,
    rewards/margins, mean_token_accuracy, ...)."""
    row: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
    if total_steps is not None:
        row["total_steps"] = int(total_steps)
    if epoch is not None:
        row["epoch"] = float(epoch)
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            row[key] = float(value)
    with path(job_dir).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read(job_dir: Path) -> list[dict[str, Any]]:
    """One dict per logged step, oldest first. Lines of the same step are merged (train and eval logs
    of a step; a step logged again after a resume from an earlier checkpoint: the later values win),
    and `time` is when the step's training loss was logged."""
    file = path(job_dir)
    if not file.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    with file.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                continue
            merged = by_step.setdefault(row["step"], {})
            logged_at = merged.get("time")
            merged.update(row)
            if logged_at is not None and "loss" not in row:
                # a step's time is when its training loss was logged: its eval line, or the Trainer's end-of-run
                # summary (logged at the last step, after a stop's checkpoint was saved), do not move it
                merged["time"] = logged_at
    return [by_step[step] for step in sorted(by_step)]


__all__ = ["FILE_NAME", "append", "path", "read"]
