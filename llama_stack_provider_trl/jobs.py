"""The job table: every job's record, kept in memory for reads and written to the
stack's key-value store at every change, so it survives restarts.

Writes come from request handlers (the server's event loop) and from the training
thread. They all go through one private event loop on a thread of its own, so
they are applied in the order they were made, whatever thread made them.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Literal

from llama_stack_api.common.errors import ConflictError, ResourceNotFoundError
from pydantic import BaseModel, Field

from .api.models import (
    Checkpoint,
    JobStatus,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    TrainingProgress,
)

KEY_PREFIX = "job:"
FINAL_STATES = (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


def now() -> datetime:
    return datetime.now(UTC)


class JobNotFoundError(ResourceNotFoundError):
    def __init__(self, job_uuid: str) -> None:
        super().__init__(job_uuid, "Training job")


class JobRecord(BaseModel):
    job_uuid: str
    method: Literal["dpo", "sft"]
    request: dict[str, Any] = Field(description="The validated request, as JSON.")
    status: JobStatus = JobStatus.scheduled
    scheduled_at: datetime = Field(default_factory=now)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    sequence: int = Field(default=0, description="Submission order; the scheduler runs jobs in this order.")
    progress: TrainingProgress | None = None
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    resources_allocated: dict[str, Any] | None = None
    n_rows: int = Field(default=0, description="Training rows accepted; with the request, it fixes the step count.")
    resumed_from_step: int | None = Field(default=None, description="Set when the job continued after a restart.")

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES

    def status_response(self) -> PostTrainingJobStatusResponse:
        return PostTrainingJobStatusResponse(
            job_uuid=self.job_uuid,
            status=self.status,
            scheduled_at=self.scheduled_at,
            started_at=self.started_at,
            completed_at=self.completed_at,
            resources_allocated=self.resources_allocated,
            checkpoints=self.checkpoints,
            progress=self.progress,
            error=self.error,
            warnings=self.warnings,
        )

    def artifacts_response(self) -> PostTrainingJobArtifactsResponse:
        return PostTrainingJobArtifactsResponse(job_uuid=self.job_uuid, checkpoints=self.checkpoints)


class JobTable:
    def __init__(self, kvstore: Any) -> None:
        self._kvstore = kvstore
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self._reserved: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._write_lock = asyncio.Lock()
        self._writer = threading.Thread(target=self._loop.run_forever, name="trl-jobstore", daemon=True)
        self._writer.start()

    async def load(self) -> list[JobRecord]:
        """Read every stored record (once, at start-up)."""
        values = await self._kvstore.values_in_range(KEY_PREFIX, KEY_PREFIX + "\xff")
        records = sorted((JobRecord.model_validate_json(v) for v in values), key=lambda r: r.sequence)
        with self._lock:
            self._jobs = {r.job_uuid: r for r in records}
        return records

    def _persist(self, record: JobRecord) -> Future:
        payload = record.model_dump_json()
        return asyncio.run_coroutine_threadsafe(self._write(record.job_uuid, payload), self._loop)

    async def _write(self, job_uuid: str, payload: str) -> None:
        # Each write is its own task; without the lock, a later state could commit before an
        # earlier one and be overwritten by it. asyncio.Lock wakes waiters in FIFO order.
        async with self._write_lock:
            await self._kvstore.set(KEY_PREFIX + job_uuid, payload)

    def snapshot(self, job_uuid: str) -> JobRecord:
        with self._lock:
            record = self._jobs.get(job_uuid)
            if record is None:
                raise JobNotFoundError(job_uuid)
            return record.model_copy(deep=True)

    def all(self) -> list[JobRecord]:
        with self._lock:
            return sorted((r.model_copy() for r in self._jobs.values()), key=lambda r: r.sequence)

    def add(self, record: JobRecord) -> Future:
        with self._lock:
            if record.job_uuid in self._jobs:
                raise ConflictError(f"job_uuid '{record.job_uuid}' already exists; choose another one")
            record.sequence = max((r.sequence for r in self._jobs.values()), default=0) + 1
            self._jobs[record.job_uuid] = record
            self._reserved.discard(record.job_uuid)
            return self._persist(record.model_copy(deep=True))

    def reserve(self, job_uuid: str) -> None:
        """Claim a job_uuid while its request is validated, so two requests can't both take it."""
        with self._lock:
            if job_uuid in self._jobs or job_uuid in self._reserved:
                raise ConflictError(f"job_uuid '{job_uuid}' already exists; choose another one")
            self._reserved.add(job_uuid)

    def release(self, job_uuid: str) -> None:
        with self._lock:
            self._reserved.discard(job_uuid)

    def update(self, job_uuid: str, persist: bool = True, **changes: Any) -> Future | None:
        """Change a record; persist=False is for progress ticks between logged steps."""
        with self._lock:
            record = self._jobs[job_uuid]
            for key, value in changes.items():
                setattr(record, key, value)
            return self._persist(record.model_copy(deep=True)) if persist else None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every write made so far has reached the store."""
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(timeout)

    def close(self) -> None:
        self.flush()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._writer.join(timeout=5)


__all__ = ["JobRecord", "JobTable", "JobNotFoundError", "FINAL_STATES", "now"]
