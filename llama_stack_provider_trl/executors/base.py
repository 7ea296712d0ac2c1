"""The executor interface: the scheduler decides which job starts when, on which devices; an executor
starts the job's processes, relays their reports, stops them, and says how they ended.

A cluster backend plugs in beside the local one by implementing these two classes; the scheduler and
the recipes do not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..worker.channel import JobSpec

Report = Callable[[bool, dict[str, Any]], None]
"""report(persist, fields): progress and record fields from the job's rank 0, as the worker sent them."""


@dataclass
class Outcome:
    status: Literal["completed", "failed", "interrupted", "killed"]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class RunningJob(Protocol):
    def processes(self) -> list[dict[str, Any]]:
        """{rank, pid, host} of each of the job's processes that has started."""
        ...

    def wait(self, report: Report) -> Outcome:
        """Relay the job's reports until its processes are gone; how they ended."""
        ...

    def stop(self) -> None:
        """Ask for a resumable checkpoint at the next step, then an end ("interrupted")."""
        ...

    def kill(self) -> None:
        """End every process of the job now."""
        ...


class Executor(Protocol):
    name: str

    def devices(self) -> list[str]:
        """The devices jobs can be given: CUDA ids, or ["cpu"]."""
        ...

    def start(self, spec: JobSpec) -> RunningJob: ...

    def prepare(self) -> None:
        """Called while the scheduler has nothing to start: get ready for the next job."""
        ...

    def close(self) -> None: ...
