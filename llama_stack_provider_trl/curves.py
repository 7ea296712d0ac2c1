"""A job's training curves, drawn as <job_dir>/curves.png beside its artifacts from its metrics history.

Rank 0's trainer callback redraws the picture while the job trains (at most every REDRAW_EVERY_S seconds, so
drawing stays a small fraction of training time) and once more when training ends. It is written to a temp file
and renamed into place, so whoever opens it (a person, the server) never sees half a PNG. A drawing error never
fails the job: it becomes one warning in the job's status.

Worker-only: imports matplotlib (the fork server imports it with the recipes, so jobs do not pay for it); the
server never imports this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display, no GUI toolkit

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import history  # noqa: E402

log = logging.getLogger(__name__)

FILE_NAME = "curves.png"
# A drawing takes about 0.3 s of CPU (bench/curves.py): every 15 s keeps it near 2% of a long job's time, and a
# job shorter than that draws once, at the end.
REDRAW_EVERY_S = 15.0

# Per method, one panel per quantity, each with its training and validation series (TRL's names; validation
# ones are the same names prefixed with eval_). A panel is drawn only when the job logged one of its series.
PANELS: dict[str, tuple[tuple[str, str], ...]] = {
    "dpo": (
        ("loss", "loss"),
        ("reward margin (chosen - rejected)", "rewards/margins"),
        ("reward accuracy (chosen > rejected)", "rewards/accuracies"),
    ),
    "sft": (
        ("loss", "loss"),
        ("token accuracy", "mean_token_accuracy"),
    ),
}


def path(job_dir: Path) -> Path:
    return job_dir / FILE_NAME


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if key in row]
    return [s for s, _ in points], [v for _, v in points]


def draw(job_dir: Path, method: str, title: str = "") -> Path | None:
    """Draw the job's curves from its metrics history; None (and no file) while nothing is logged yet."""
    rows = history.read(job_dir)
    panels = [(name, key) for name, key in PANELS[method] if any(key in r or f"eval_{key}" in r for r in rows)]
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.4), dpi=100)
    # fixed margins: a layout engine (constrained, tight) measures every label several times, 2.5x the drawing
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.84, wspace=0.22)
    FigureCanvasAgg(figure)
    for ax, (name, key) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, k, style in (("train", key, "-"), ("validation", f"eval_{key}", "--")):
            steps, values = series(rows, k)
            if steps:
                # markers while points are few, so a short job's curve (or a single point) is visible
                ax.plot(steps, values, style, marker="o" if len(steps) <= 40 else None, markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if any(f"eval_{key}" in r for r in rows):
            ax.legend(fontsize=8)
    last = rows[-1]
    figure.suptitle(f"{title}  step {last['step']}" + (f"/{last['total_steps']}" if "total_steps" in last else ""),
                    fontsize=11)
    target = path(job_dir)
    scratch = job_dir / f".{FILE_NAME}.partial"
    try:
        figure.savefig(scratch, format="png")
        os.replace(scratch, target)
    except BaseException:
        scratch.unlink(missing_ok=True)  # a full disk, say: leave no half-written picture behind
        raise
    return target


class Redrawer:
    """Redraws a job's curves on the trainer's log calls, throttled, and says once where the picture is.

    `report(**fields)` goes to the job's status: `curves=<path>` after the first drawing, `warnings=[...]`
    the first time drawing fails (later failures are only logged)."""

    def __init__(self, job_dir: Path, method: str, title: str, report: Callable[..., None],
                 every_s: float = REDRAW_EVERY_S) -> None:
        self.job_dir = job_dir
        self.method = method
        self.title = title
        self.report = report
        self.every_s = every_s
        self.last = time.monotonic()  # the first redraw comes every_s after training starts, not at its first log
        self.reported = False
        self.failed = False

    def maybe(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.now()

    def now(self) -> None:
        try:
            drawn = draw(self.job_dir, self.method, self.title)
        except Exception as exc:  # noqa: BLE001 - a picture is never worth a failed job
            log.warning("drawing %s failed: %s", path(self.job_dir), exc, exc_info=True)
            if not self.failed:
                self.failed = True
                self.report(warnings=[f"training curves could not be drawn: {type(exc).__name__}: {exc}"])
        else:
            if drawn is not None and not self.reported:
                self.reported = True
                self.report(curves=str(drawn))
        finally:
            self.last = time.monotonic()


__all__ = ["FILE_NAME", "REDRAW_EVERY_S", "Redrawer", "draw", "path"]
