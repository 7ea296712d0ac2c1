"""The job table: every job's record, kept in memory for reads and written to the
stack's key-value store at every change, so it survives restarts.

Writes come from request handlers (the server's event loop) and from the training
thread. They all go through one private event loop on a thread of its own, so
they are applied in the order they were made, whatever thread made them.

A job exists only once its first record is stored: `add` writes before the job
becomes visible, and a failed write there is a 503 that leaves nothing behind.
Later writes are retried; one that still fails is logged and shown in the job's
status, since that state would be lost at a restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Literal

from llama_stack_api.common.errors import ConflictError, ResourceNotFoundError
from pydantic import BaseModel, Field

from .access import Owner, choose_key, principal_of
from .api.models import (
    Checkpoint,
    JobStatus,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    TrainingProgress,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "job:"
# Seconds between tries of a write that failed (a database locked by another process, a full disk):
# about 30 s in all before the failure is reported.
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
FINAL_STATES = (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


def now() -> datetime:
    return datetime.now(UTC)


class JobNotFoundError(ResourceNotFoundError):
    def __init__(self, job_uuid: str) -> None:
        super().__init__(job_uuid, "Training job")


class StoreUnavailable(RuntimeError):
    """The job store refused a write the request depends on: a 503, and nothing was kept."""

    status_code = 503


class TooManyJobs(RuntimeError):
    status_code = 429


class JobRecord(BaseModel):
    job_uuid: str = Field(description="The job's key: the client's id; with authentication, scoped by its owner (access.py).")
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
    attempts: int = Field(default=0, description="How many times the job has started training (resumes included).")
    crashes: int = Field(default=0, description="Starts that ended with the server dying without a clean shutdown.")
    paused: bool = Field(default=False, description="Paused (status scheduled, not queued) until resumed.")
    events: list[dict[str, Any]] = Field(
        default_factory=list, description="Lifecycle events (created, validated, paused, resumed), oldest first: "
        "{created_at (Unix s), level, message, data}; the rest of a job's events follow from its record and history.")
    openai: dict[str, Any] | None = Field(
        default=None, description="For jobs created through /v1/fine_tuning/jobs: the OpenAI request's fields "
        "(openai_ft.py), resolved.")
    owner: Owner | None = Field(default=None, description="Who created the job, with authentication on.")

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES

    def add_event(self, message: str, level: str = "info", **data: Any) -> list[dict[str, Any]]:
        """The events with one more, for an update(events=...)."""
        event = {"created_at": now().timestamp(), "level": level, "message": message}
        if data:
            event["data"] = data
        return [*self.events, event]

    def status_response(self, shown_id: str | None = None) -> PostTrainingJobStatusResponse:
        return PostTrainingJobStatusResponse(
            job_uuid=shown_id or self.job_uuid,
            status=self.status,
            scheduled_at=self.scheduled_at,
            started_at=self.started_at,
            completed_at=self.completed_at,
            resources_allocated=self.resources_allocated,
            checkpoints=self.checkpoints,
            progress=self.progress,
            error=self.error,
            warnings=self.warnings,
            attempts=self.attempts,
        )

    def artifacts_response(self, shown_id: str | None = None) -> PostTrainingJobArtifactsResponse:
        return PostTrainingJobArtifactsResponse(job_uuid=shown_id or self.job_uuid, checkpoints=self.checkpoints)


class JobTable:
    def __init__(self, kvstore: Any, retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self._kvstore = kvstore
        self._retry_delays = retry_delays
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self._reserved: dict[str, str | None] = {}  # key -> its owner's principal
        self._next_sequence = 1
        self._store_errors: dict[str, str] = {}  # job -> why its latest state is not stored
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
            self._next_sequence = max((r.sequence for r in records), default=0) + 1
        return records

    def _persist(self, record: JobRecord) -> Future:
        payload = record.model_dump_json()
        return asyncio.run_coroutine_threadsafe(self._write(record.job_uuid, payload), self._loop)

    async def _write(self, job_uuid: str, payload: str, retry: bool = True) -> None:
        # Each write is its own task; without the lock, a later state could commit before an
        # earlier one and be overwritten by it. asyncio.Lock wakes waiters in FIFO order.
        async with self._write_lock:
            delays = self._retry_delays if retry else ()
            for attempt in range(len(delays) + 1):
                try:
                    await self._kvstore.set(KEY_PREFIX + job_uuid, payload)
                except Exception as exc:  # noqa: BLE001 - any store failure is retried, then reported
                    if attempt == len(delays):
                        if retry:
                            self._store_failed(job_uuid, exc)
                        raise
                    await asyncio.sleep(delays[attempt])
                else:
                    if attempt or job_uuid in self._store_errors:
                        log.info("job store: job %s stored again after %d retries", job_uuid, attempt)
                    self._store_errors.pop(job_uuid, None)
                    return

    def _store_failed(self, job_uuid: str, exc: Exception) -> None:
        message = (f"job store: this job's latest state could not be saved ({type(exc).__name__}: {exc}); "
                   "it will be lost if the server restarts before a later save succeeds")
        log.error("job %s: %s", job_uuid, message)
        self._store_errors[job_uuid] = message

    def snapshot(self, job_uuid: str) -> JobRecord:
        with self._lock:
            record = self._jobs.get(job_uuid)
            if record is None:
                raise JobNotFoundError(job_uuid)
            record = record.model_copy(deep=True)
        problem = self._store_errors.get(job_uuid)
        if problem:
            record.warnings.append(problem)
        return record

    def all(self) -> list[JobRecord]:
        with self._lock:
            return sorted((r.model_copy() for r in self._jobs.values()), key=lambda r: r.sequence)

    async def add(self, record: JobRecord) -> None:
        """Store a new job's record, then make it visible. Raises StoreUnavailable if the store
        refuses it; the job then does not exist anywhere."""
        with self._lock:
            if record.job_uuid in self._jobs:
                raise ConflictError(f"job_uuid '{record.job_uuid}' already exists; choose another one")
            record.sequence = self._next_sequence
            self._next_sequence += 1
        payload = record.model_dump_json()
        future = asyncio.run_coroutine_threadsafe(self._write(record.job_uuid, payload, retry=False), self._loop)
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:
            log.error("job %s: the job store refused its record: %s", record.job_uuid, exc)
            raise StoreUnavailable(
                f"the job store could not record job '{record.job_uuid}' ({type(exc).__name__}: {exc}); "
                "nothing was queued, try again"
            ) from None
        with self._lock:
            self._jobs[record.job_uuid] = record
            self._reserved.pop(record.job_uuid, None)

    def reserve(self, job_uuid: str, max_active: int | None = None, owner: str | None = None,
                max_per_owner: int | None = None) -> str:
        """Claim a key for a new job while its request is validated, so two requests can't both take it;
        returns the key (access.choose_key). With max_active, refuse (429) when that many jobs are already
        waiting or running; with max_per_owner, when that many of this owner's are."""
        with self._lock:
            key = choose_key(job_uuid, owner, self._jobs.keys() | self._reserved.keys())
            # the owners of the jobs waiting or running, and of those being validated
            active = [principal_of(r.owner) for r in self._jobs.values() if not r.is_final]
            active += self._reserved.values()
            if max_active is not None and len(active) >= max_active:
                raise TooManyJobs(f"{len(active)} jobs are already waiting or running, the provider's "
                                  f"limits.max_queued_jobs ({max_active}); try again when some have finished")
            if max_per_owner is not None:
                mine = sum(principal == owner for principal in active)
                if mine >= max_per_owner:
                    raise TooManyJobs(f"{mine} of your jobs are already waiting or running, the provider's "
                                      f"limits.max_active_jobs_per_user ({max_per_owner}); try again when some "
                                      "have finished")
            self._reserved[key] = owner
            return key

    def release(self, key: str) -> None:
        with self._lock:
            self._reserved.pop(key, None)

    def update(self, job_uuid: str, persist: bool = True, **changes: Any) -> Future | None:
        """Change a record; persist=False is for progress ticks between logged steps."""
        with self._lock:
            record = self._jobs[job_uuid]
            for key, value in changes.items():
                setattr(record, key, value)
            return self._persist(record.model_copy(deep=True)) if persist else None

    async def delete(self, job_uuid: str) -> JobRecord:
        """Remove a finished job's record from the store, then from memory; returns it."""
        record = self.snapshot(job_uuid)
        if not record.is_final:
            raise ConflictError(f"job '{job_uuid}' is {record.status.value}; cancel it and wait for it to end "
                                "before deleting it")

        async def remove() -> None:
            async with self._write_lock:
                await self._kvstore.delete(KEY_PREFIX + job_uuid)

        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(remove(), self._loop))
        except Exception as exc:
            raise StoreUnavailable(f"the job store could not delete job '{job_uuid}' ({type(exc).__name__}: "
                                   f"{exc}); nothing was deleted, try again") from None
        with self._lock:
            self._jobs.pop(job_uuid, None)
        self._store_errors.pop(job_uuid, None)
        return record

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every write made so far has reached the store (or given up)."""
        async def barrier() -> None:
            async with self._write_lock:
                pass

        asyncio.run_coroutine_threadsafe(barrier(), self._loop).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.flush(timeout)
        except TimeoutError:
            log.error("job store: writes still pending at shutdown; the latest job states may be lost")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._writer.join(timeout=5)


__all__ = ["JobRecord", "JobTable", "JobNotFoundError", "StoreUnavailable", "TooManyJobs", "FINAL_STATES", "now"]
