"""Which job trains when, on which devices; the training itself happens in the executor's processes.

One scheduling thread starts jobs in submission order: the oldest waiting job starts as soon as its
devices are free and fewer than max_concurrent_jobs run, and nothing behind it starts first, so a
large job is never starved by a stream of small ones. Each running job has a watcher thread that
relays its reports into the job table and records how it ended. A plain thread rather than asyncio:
Llama Stack initialises providers in a throwaway event loop, and the executor's processes die with
the thread that started them, so they are all started from this long-lived one.

Nothing a job does may end the scheduling thread: a job that cannot be planned or started fails
alone, with its reason, and the queue moves on.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .api.models import Checkpoint, JobStatus, TrainingProgress
from .config import TrlPostTrainingConfig
from .executors.base import Executor, Outcome, RunningJob
from .failures import describe_exception
from .jobs import JobRecord, JobTable, now
from .plan import TrainingPlan
from .worker.channel import JobSpec

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted by server shutdown"
CRASHED = ("the server died while this job was running, without a clean shutdown (the kernel's out-of-memory "
           "killer is the usual cause: lower batch_size or max_seq_length)")
RESULT_FILE = "result.json"  # written when a job's artifacts are complete, before its record says so
RECORD_FIELDS = ("warnings", "resources_allocated", "resumed_from_step")  # reports that belong to the record


@dataclass
class Running:
    devices: list[str]
    handle: RunningJob | None = None
    cancelled: bool = False
    pausing: bool = False  # stop at a resumable checkpoint, then wait for a resume
    watcher: threading.Thread | None = field(default=None, repr=False)


class Scheduler:
    def __init__(self, table: JobTable, config: TrlPostTrainingConfig,
                 plan_for: Callable[[JobRecord], TrainingPlan], executor: Executor) -> None:
        self.table = table
        self.config = config
        self.plan_for = plan_for
        self.executor = executor
        self._lock = threading.Condition()  # guards everything below and every job state transition
        self._waiting: list[str] = []
        self._running: dict[str, Running] = {}
        self._free = list(executor.devices())
        self._on_gpus = self._free != ["cpu"]
        self._stopping = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trl-scheduler", daemon=True)

    @property
    def per_job_devices(self) -> int:
        """GPUs a job holds; CPU jobs share the cores, bounded by max_concurrent_jobs alone."""
        return self.config.processes_per_job if self._on_gpus else 0

    @property
    def max_concurrent(self) -> int:
        if self.config.max_concurrent_jobs is not None:
            return self.config.max_concurrent_jobs
        return 1 if self.per_job_devices == 0 else max(1, len(self.executor.devices()) // self.per_job_devices)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job_uuid: str) -> None:
        with self._lock:
            self._waiting.append(job_uuid)
            self._lock.notify_all()

    # ---- cancel / shutdown (called from the server's event loop) ----------------------------

    def cancel(self, job_uuid: str) -> JobStatus:
        """Cancel a waiting job at once, or kill the running one's processes; returns the status now.
        A job that has already ended (completed, failed) answers with that status: too late."""
        with self._lock:
            record = self.table.snapshot(job_uuid)
            if record.status == JobStatus.scheduled:
                if record.paused:  # its resumable checkpoint is of no use any more
                    self.discard(self.config.resolved_output_dir() / job_uuid)
                self.table.update(job_uuid, status=JobStatus.cancelled, completed_at=now(), paused=False)
                return JobStatus.cancelled
            running = self._running.get(job_uuid)
            if record.status == JobStatus.in_progress and running is not None:
                running.cancelled = True
                if running.handle is not None:
                    running.handle.kill()
            return record.status

    def pause(self, job_uuid: str) -> str:
        """Take a job out of the queue: a waiting one at once; a running one stops at its next step with a
        resumable checkpoint (the shutdown's stop request, for this job alone) and gives its devices back.
        Returns "paused", "pausing", or the final status of a job that has already ended."""
        with self._lock:
            record = self.table.snapshot(job_uuid)
            if record.paused:
                return "paused"
            if record.status == JobStatus.scheduled:
                self.table.update(job_uuid, paused=True, progress=self._phase(job_uuid, "paused"),
                                  events=record.add_event("Fine-tuning job paused while queued",
                                                          step=record.progress.step if record.progress else 0))
                return "paused"
            running = self._running.get(job_uuid)
            if record.status == JobStatus.in_progress and running is not None:
                running.pausing = True
                if running.handle is not None:
                    running.handle.stop()
                return "pausing"
            return record.status.value

    def resume(self, job_uuid: str) -> bool:
        """Queue a paused job again; its worker resumes from the latest checkpoint. False if it is not paused."""
        with self._lock:
            record = self.table.snapshot(job_uuid)
            if not record.paused or record.status != JobStatus.scheduled:
                return False
            self.table.update(job_uuid, paused=False, progress=self._phase(job_uuid, "queued"),
                              events=record.add_event("Fine-tuning job resumed"))
            self._waiting.append(job_uuid)
            self._lock.notify_all()
            return True

    def shutdown(self, timeout: float) -> None:
        """Ask running jobs for a checkpoint, record what happens to them, kill what is left at `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            for job_uuid, running in self._running.items():
                # persist first: if saving the checkpoint outlasts the timeout, the record is right anyway
                if self.config.resume_interrupted_jobs:
                    self.table.update(job_uuid, status=JobStatus.scheduled,
                                      warnings=self._with_warning(job_uuid, f"{INTERRUPTED}; resumes at restart"))
                else:
                    self.table.update(job_uuid, status=JobStatus.failed, error=INTERRUPTED, completed_at=now())
                if running.handle is not None:
                    running.handle.stop()
            if not self.config.resume_interrupted_jobs:
                for record in self.table.all():
                    if record.status == JobStatus.scheduled and not record.paused:  # paused ones wait for a resume
                        self.table.update(record.job_uuid, status=JobStatus.failed, error=INTERRUPTED,
                                          completed_at=now())
            watchers = [r.watcher for r in self._running.values() if r.watcher is not None]
            self._lock.notify_all()
        for watcher in watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for running in self._running.values():
                if running.handle is not None:
                    running.handle.kill()
        self.executor.close()
        self._closed.set()
        self._thread.join(max(0.5, deadline - time.monotonic()))

    def _with_warning(self, job_uuid: str, warning: str) -> list[str]:
        warnings = self.table.snapshot(job_uuid).warnings
        return warnings if warning in warnings else [*warnings, warning]

    # ---- the scheduling thread --------------------------------------------------------------

    def _run(self) -> None:
        self.sweep_data()
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self._next() is not None or not self._running, timeout=5)
                if self._stopping:
                    break
                job_uuid = self._next()
                idle = job_uuid is None and not self._running
            if job_uuid is not None:
                try:
                    self._start(job_uuid)
                except BaseException:  # noqa: BLE001 - whatever happens, the next job still runs
                    log.exception("job %s: unexpected failure starting it", job_uuid)
                    self._fail_quietly(job_uuid, f"internal error starting the job: {traceback.format_exc(limit=1)}")
            elif idle:
                try:
                    self.executor.prepare()  # a warm worker for the next job, while nothing trains
                except Exception:  # noqa: BLE001 - jobs then start cold; the log says why
                    log.exception("preparing a worker failed")
                with self._lock:
                    self._lock.wait_for(lambda: self._stopping or bool(self._waiting), timeout=30)
        # the executor's processes die with this thread: it ends only when shutdown() is done with them
        self._closed.wait()

    def _next(self) -> str | None:
        """The oldest waiting job if it can start now (lock held); jobs cancelled while waiting drop out."""
        while self._waiting:
            job_uuid = self._waiting[0]
            try:
                record = self.table.snapshot(job_uuid)
                if record.status != JobStatus.scheduled or record.paused:
                    self._waiting.pop(0)
                    continue
            except Exception:  # noqa: BLE001 - deleted meanwhile
                self._waiting.pop(0)
                continue
            if len(self._running) >= self.max_concurrent or len(self._free) < self.per_job_devices:
                return None
            return job_uuid
        return None

    def _start(self, job_uuid: str) -> None:
        with self._lock:
            self._waiting.remove(job_uuid)
            record = self.table.snapshot(job_uuid)
            if record.status != JobStatus.scheduled or record.paused:
                return
            try:
                plan = self.plan_for(record)
            except Exception as exc:  # noqa: BLE001 - limits changed, model gone, data missing: this job only
                log.warning("job %s cannot start: %s", job_uuid, exc)
                self.table.update(job_uuid, status=JobStatus.failed, completed_at=now(),
                                  error=f"could not start: {describe_exception(exc)}")
                return
            n = self.per_job_devices
            devices, self._free = (self._free[:n], self._free[n:]) if n else (["cpu"], self._free)
            running = self._running[job_uuid] = Running(devices=devices)
            self.table.update(job_uuid, status=JobStatus.in_progress, started_at=record.started_at or now(),
                              attempts=record.attempts + 1, error=None,
                              resources_allocated={"executor": self.executor.name, "world_size": plan.processes,
                                                   "devices": devices, "processes": []},
                              progress=TrainingProgress(phase="starting", total_steps=plan.max_steps,
                                                        step=record.progress.step if record.progress else 0))
        spec = JobSpec(job_uuid=job_uuid, job_dir=str(self.config.resolved_output_dir() / job_uuid),
                       method=record.method, request=record.request, config=self.config.model_dump(mode="json"),
                       plan=asdict(plan), world_size=plan.processes, devices=devices)
        try:
            handle = self.executor.start(spec)
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: its worker could not be started", job_uuid)
            self._finish(job_uuid, Outcome("failed", error=f"could not start its worker: {describe_exception(exc)}"))
            return
        with self._lock:
            running.handle = handle
            if running.cancelled:
                handle.kill()
            elif running.pausing:
                handle.stop()
            running.watcher = threading.Thread(target=self._watch, args=(job_uuid, handle),
                                               name=f"trl-job-{job_uuid}", daemon=True)
            running.watcher.start()

    def _watch(self, job_uuid: str, handle: RunningJob) -> None:
        try:
            outcome = handle.wait(lambda persist, fields: self._report(job_uuid, persist, fields))
        except BaseException as exc:  # noqa: BLE001
            log.exception("job %s: watching it failed", job_uuid)
            handle.kill()
            outcome = Outcome("failed", error=f"internal error watching the job: {describe_exception(exc)}")
        self._finish(job_uuid, outcome)

    def _finish(self, job_uuid: str, outcome: Outcome) -> None:
        """Record how a job ended and give its devices back; cancel and shutdown decide under the same lock."""
        job_dir = self.config.resolved_output_dir() / job_uuid
        with self._lock:
            running = self._running.pop(job_uuid)
            if running.devices != ["cpu"]:
                self._free.extend(running.devices)
            try:
                if running.cancelled:
                    self.discard(job_dir)
                    self.table.update(job_uuid, status=JobStatus.cancelled, completed_at=now(),
                                      progress=self._phase(job_uuid, "cancelled"))
                elif running.pausing and outcome.status == "interrupted":
                    record = self.table.snapshot(job_uuid)
                    step = record.progress.step if record.progress else 0
                    self.table.update(job_uuid, status=JobStatus.scheduled, paused=True,
                                      progress=self._phase(job_uuid, "paused"),
                                      events=record.add_event(f"Fine-tuning job paused at step {step}", step=step))
                elif self._stopping and outcome.status in ("interrupted", "killed"):
                    pass  # shutdown() recorded its state; the checkpoint, if any, resumes at restart
                elif outcome.status == "completed":
                    checkpoints = [Checkpoint.model_validate(c) for c in outcome.checkpoints]
                    write_result(job_dir, checkpoints)
                    self.table.update(job_uuid, status=JobStatus.completed, completed_at=now(), checkpoints=checkpoints,
                                      progress=self._phase(job_uuid, "completed"))
                else:
                    self.discard(job_dir)
                    error = outcome.error or f"its processes ended ({outcome.status}) without saying why"
                    log.error("job %s failed: %s", job_uuid, error)
                    self.table.update(job_uuid, status=JobStatus.failed, completed_at=now(), error=error,
                                      progress=self._phase(job_uuid, "failed"))
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk writing result.json
                log.exception("job %s: recording its end failed", job_uuid)
                self._fail_quietly(job_uuid, describe_exception(exc))
            self._lock.notify_all()
        self.sweep_data()

    def _report(self, job_uuid: str, persist: bool, fields: dict[str, Any]) -> None:
        fields = dict(fields)
        record_fields = {k: fields.pop(k) for k in RECORD_FIELDS if k in fields}
        record = self.table.snapshot(job_uuid)
        if "warnings" in record_fields:
            record_fields["warnings"] = record.warnings + [w for w in record_fields["warnings"] if w not in record.warnings]
        if "resources_allocated" in record_fields:  # the worker adds device, precision, processes
            record_fields["resources_allocated"] = {**(record.resources_allocated or {}),
                                                    **record_fields["resources_allocated"]}
        progress = (record.progress or TrainingProgress()).model_copy(update=fields)
        self.table.update(job_uuid, persist=persist, progress=progress, **record_fields)

    def _phase(self, job_uuid: str, phase: str) -> TrainingProgress:
        progress = self.table.snapshot(job_uuid).progress or TrainingProgress()
        return progress.model_copy(update={"phase": phase, "eta_seconds": None})

    def _fail_quietly(self, job_uuid: str, error: str) -> None:
        try:
            if not self.table.snapshot(job_uuid).is_final:
                self.table.update(job_uuid, status=JobStatus.failed, completed_at=now(), error=error)
        except Exception:  # noqa: BLE001 - the record itself may be what is broken
            log.exception("job %s: could not record its failure", job_uuid)

    @staticmethod
    def discard(job_dir: Path) -> None:
        """A failed or cancelled job keeps its data snapshot (for diagnosis, see sweep_data) and its
        worker.log, but no model."""
        for name in ("checkpoints", "final", "merged", ".final.partial", ".merged.partial", RESULT_FILE):
            path = job_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def sweep_data(self) -> None:
        """Remove the data snapshots of failed and cancelled jobs older than the retention period."""
        cutoff = now() - timedelta(hours=self.config.failed_job_data_retention_hours)
        output_dir = self.config.resolved_output_dir()
        for record in self.table.all():
            if record.status not in (JobStatus.failed, JobStatus.cancelled) or record.completed_at is None:
                continue
            data = output_dir / record.job_uuid / "data"
            if record.completed_at <= cutoff and data.exists():
                shutil.rmtree(data, ignore_errors=True)
                log.info("job %s: data snapshot removed (%s, retention %s h)", record.job_uuid,
                         record.status.value, self.config.failed_job_data_retention_hours)


def write_result(job_dir: Path, checkpoints: list[Checkpoint]) -> None:
    """The job's artifacts are complete: say so on disk, so a restart never trains it again even if
    the job store could not record it."""
    path = job_dir / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"completed_at": time.time(), "checkpoints": [c.model_dump(mode="json") for c in checkpoints]}))
    tmp.replace(path)


def read_result(job_dir: Path) -> list[Checkpoint] | None:
    path = job_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return [Checkpoint.model_validate(c) for c in json.loads(path.read_text())["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


__all__ = ["Scheduler", "INTERRUPTED", "CRASHED", "read_result"]
