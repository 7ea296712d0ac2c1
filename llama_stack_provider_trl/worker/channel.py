"""The files through which the server and a job's worker processes talk, in the job's directory.

    <job_dir>/worker/spec.json       the job, written by the server before it starts the worker
    <job_dir>/worker/events.jsonl    appended by the worker: progress (rank 0), errors (any rank), the end (rank 0)
    <job_dir>/worker/rank-<r>.json   each rank's pid and host (and node address on a Ray cluster), written as it starts
    <job_dir>/worker/stop            made by the server at shutdown: save a checkpoint at the next step and stop
    <job_dir>/worker/worker.log      the processes' stdout and stderr

Files rather than pipes because every rank, whoever launched it (torchrun, the fork server, Ray Train on
another node of a cluster whose nodes share output_dir), can reach them, and a line appended with O_APPEND
arrives whole. No torch here: the server imports this module.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TICK_INTERVAL_S = 0.25  # progress ticks between logged steps are written at most this often


@dataclass
class JobSpec:
    """Everything a worker needs to run a job, and nothing it would have to ask the server for."""

    job_uuid: str
    job_dir: str
    method: str
    request: dict[str, Any]
    config: dict[str, Any]
    plan: dict[str, Any]
    resume_from: str | None = None
    world_size: int = 1
    devices: list[str] = field(default_factory=lambda: ["cpu"])

    @staticmethod
    def path(job_dir: Path) -> Path:
        return worker_dir(job_dir) / "spec.json"

    def write(self) -> Path:
        path = self.path(Path(self.job_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))


def worker_dir(job_dir: Path) -> Path:
    return Path(job_dir) / "worker"


def reset(job_dir: Path) -> None:
    """Before a start: nothing of an earlier attempt's messages may be read as this one's."""
    directory = worker_dir(job_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl", "stop"):
        (directory / name).unlink(missing_ok=True)
    for path in directory.glob("rank-*.json"):
        path.unlink()


# ---- the worker's side ----------------------------------------------------------------------


class EventWriter:
    def __init__(self, job_dir: Path, rank: int) -> None:
        self.directory = worker_dir(job_dir)
        self.rank = rank
        self._pending_tick: dict[str, Any] | None = None
        self._last_tick = 0.0

    def _append(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event) + "\n").encode()
        fd = os.open(self.directory / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def register(self, address: str | None = None) -> None:
        """This rank's pid and host; `address`: its node's address on a cluster (Ray's node IP)."""
        path = self.directory / f"rank-{self.rank}.json"
        found = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname()}
        path.write_text(json.dumps(found if address is None else {**found, "address": address}))

    def report(self, persist: bool = False, **fields: Any) -> None:
        """Rank 0's progress. Ticks between logged steps are merged and written at most every 0.25 s,
        so a fast job does not write a line per step; the latest one is never lost."""
        if self.rank != 0:
            return
        if not persist:
            self._pending_tick = {**(self._pending_tick or {}), **fields}
            if time.monotonic() - self._last_tick < TICK_INTERVAL_S:
                return
            self._flush_tick()
            return
        self._flush_tick()
        self._append({"type": "report", "persist": True, "fields": fields})

    def _flush_tick(self) -> None:
        if self._pending_tick:
            self._append({"type": "report", "persist": False, "fields": self._pending_tick})
            self._pending_tick = None
            self._last_tick = time.monotonic()

    def error(self, message: str) -> None:
        self._flush_tick()
        self._append({"type": "error", "rank": self.rank, "message": message})

    def end(self, status: str, checkpoints: list[dict[str, Any]] | None = None) -> None:
        if self.rank != 0:
            return
        self._flush_tick()
        self._append({"type": "end", "status": status, "checkpoints": checkpoints or []})


def stop_requested(job_dir: Path) -> bool:
    return (worker_dir(job_dir) / "stop").exists()


# ---- the server's side ----------------------------------------------------------------------


def request_stop(job_dir: Path) -> None:
    (worker_dir(job_dir) / "stop").touch()


class EventReader:
    """Reads the events a job's workers appended since the last call; a partly written line waits."""

    def __init__(self, job_dir: Path) -> None:
        self.path = worker_dir(job_dir) / "events.jsonl"
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill mid-write
        return events


def processes(job_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(worker_dir(job_dir).glob("rank-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda p: p["rank"])
