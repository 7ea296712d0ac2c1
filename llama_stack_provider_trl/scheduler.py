"""One training thread, one job at a time, in submission order.

A plain daemon thread rather than an asyncio task: Llama Stack initialises
providers in a throwaway event loop, and training must not stall the server's
loop anyway. The thread pulls job ids from a FIFO queue; cancel and shutdown
reach the running job through events its TrainerCallback checks every step.
Before training starts (loading the model, tokenizing the data) no callback
runs, so there cancel and shutdown raise their exception in the training
thread itself.

Nothing a job does may end the thread: a job that cannot even be planned or
started fails alone, with its reason, and the queue moves on.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import logging
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from .api.models import Checkpoint, JobStatus, TrainingProgress
from .config import TrlPostTrainingConfig
from .jobs import JobRecord, JobTable, now
from .plan import TrainingPlan
from .recipes.context import JobCancelled, JobContext, JobInterrupted, latest_checkpoint

log = logging.getLogger(__name__)

RECIPES = {"dpo": "llama_stack_provider_trl.recipes.dpo", "sft": "llama_stack_provider_trl.recipes.sft"}
INTERRUPTED = "interrupted by server shutdown"
CRASHED = ("the server died while this job was running, without a clean shutdown (the kernel's out-of-memory "
           "killer is the usual cause: lower batch_size or max_seq_length)")
RESULT_FILE = "result.json"  # written when a job's artifacts are complete, before its record says so


class Scheduler:
    def __init__(self, table: JobTable, config: TrlPostTrainingConfig,
                 plan_for: Callable[[JobRecord], TrainingPlan]) -> None:
        self.table = table
        self.config = config
        self.plan_for = plan_for
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()  # guards job state transitions and _current
        self._current: JobContext | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="trl-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job_uuid: str) -> None:
        self._queue.put(job_uuid)

    # ---- cancel / shutdown (called from the server's event loop) ----------------------------

    def cancel(self, job_uuid: str) -> JobStatus:
        """Cancel a waiting job at once, or make sure the running one ends cancelled; returns the status now.
        A running job that has already ended (completed, failed) answers with that status: too late."""
        with self._lock:
            record = self.table.snapshot(job_uuid)
            if record.status == JobStatus.scheduled:
                self.table.update(job_uuid, status=JobStatus.cancelled, completed_at=now())
                self.sweep_data()
                return JobStatus.cancelled
            current = self._current
            if record.status == JobStatus.in_progress and current is not None and current.job_uuid == job_uuid:
                current.cancel_requested.set()
                self._interrupt_preparation(current, JobCancelled)
            return record.status

    def shutdown(self, timeout: float) -> None:
        """Stop the running job with a checkpoint, record what happens to it, wait up to `timeout`."""
        with self._lock:
            self._stopping = True
            current = self._current
            if current is not None:
                # persist first: if saving the checkpoint outlasts the timeout, the record is right anyway
                if self.config.resume_interrupted_jobs:
                    self.table.update(current.job_uuid, status=JobStatus.scheduled,
                                      warnings=self._with_warning(current.job_uuid, f"{INTERRUPTED}; resumes at restart"))
                else:
                    self.table.update(current.job_uuid, status=JobStatus.failed, error=INTERRUPTED, completed_at=now())
                current.shutdown_requested.set()
                self._interrupt_preparation(current, JobInterrupted)
            if not self.config.resume_interrupted_jobs:
                for record in self.table.all():
                    if record.status == JobStatus.scheduled:
                        self.table.update(record.job_uuid, status=JobStatus.failed, error=INTERRUPTED, completed_at=now())
        self._queue.put(None)
        self._thread.join(timeout)

    def _interrupt_preparation(self, ctx: JobContext, exc_type: type[BaseException]) -> None:
        """While a job loads its model and tokenizes its data no callback runs, and a large dataset takes
        minutes: raise the exception in the training thread, where those libraries return to Python often."""
        with ctx.preparing_lock:
            if not ctx.preparing or self._thread.ident is None:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident), ctypes.py_object(exc_type))

    def _with_warning(self, job_uuid: str, warning: str) -> list[str]:
        warnings = self.table.snapshot(job_uuid).warnings
        return warnings if warning in warnings else [*warnings, warning]

    # ---- the training thread ----------------------------------------------------------------

    def _run(self) -> None:
        if self.config.preload_training_libraries:
            try:
                for module in RECIPES.values():
                    importlib.import_module(module)
            except Exception:  # a broken install shows up again, with its message, in the first job
                log.exception("preloading the training libraries failed")
        self.sweep_data()
        while True:
            job_uuid = self._queue.get()
            if job_uuid is None:
                return
            try:
                if not self._run_one(job_uuid):
                    return
            except BaseException:  # noqa: BLE001 - whatever happens, the next job still runs
                log.exception("job %s: unexpected failure in the scheduler", job_uuid)
                self._fail_quietly(job_uuid, f"internal error in the scheduler: {traceback.format_exc(limit=1)}")
            finally:
                with self._lock:
                    self._current = None
            self.sweep_data()

    def _run_one(self, job_uuid: str) -> bool:
        """Start and train one job; False when the scheduler is stopping."""
        with self._lock:
            if self._stopping:
                return False
            record = self.table.snapshot(job_uuid)
            if record.status != JobStatus.scheduled:
                return True  # cancelled while waiting
            try:
                ctx = self._context(record)
            except Exception as exc:  # noqa: BLE001 - limits changed, model gone, data missing: this job only
                log.warning("job %s cannot start: %s", job_uuid, exc)
                self.table.update(job_uuid, status=JobStatus.failed, completed_at=now(),
                                  error=f"could not start: {_describe(exc)}")
                return True
            self._current = ctx
            self.table.update(job_uuid, status=JobStatus.in_progress, started_at=record.started_at or now(),
                              attempts=record.attempts + 1,
                              progress=TrainingProgress(phase="starting", total_steps=ctx.plan.max_steps,
                                                        step=record.progress.step if record.progress else 0))
        self._train(ctx, record)
        return True

    def _context(self, record: JobRecord) -> JobContext:
        job_dir = self.config.resolved_output_dir() / record.job_uuid
        ctx = JobContext(
            job_uuid=record.job_uuid,
            job_dir=job_dir,
            method=record.method,
            request=record.request,
            config=self.config,
            plan=self.plan_for(record),
            report=lambda persist=False, **fields: self._report(record.job_uuid, persist, fields),
        )
        ctx.resume_from = latest_checkpoint(ctx.checkpoints_dir)
        return ctx

    def _report(self, job_uuid: str, persist: bool, fields: dict[str, Any]) -> None:
        record_fields = {k: fields.pop(k) for k in ("warnings", "resources_allocated") if k in fields}
        if "warnings" in record_fields:
            current = self.table.snapshot(job_uuid).warnings
            record_fields["warnings"] = current + [w for w in record_fields["warnings"] if w not in current]
        progress = self.table.snapshot(job_uuid).progress or TrainingProgress()
        progress = progress.model_copy(update=fields)
        self.table.update(job_uuid, persist=persist, progress=progress, **record_fields)

    def _train(self, ctx: JobContext, record: JobRecord) -> None:
        job_uuid = ctx.job_uuid
        if ctx.resume_from is not None:
            step = int(ctx.resume_from.name.rsplit("-", 1)[1])
            self.table.update(job_uuid, resumed_from_step=step,
                              warnings=self._with_warning(job_uuid, f"resumed from the checkpoint at step {step}"))
        try:
            try:
                with ctx.preparing_lock:
                    ctx.preparing = True
                recipe = importlib.import_module(RECIPES[record.method])
                checkpoints = recipe.train(ctx)
            finally:
                # no exception may be raised into this thread once the job has left the recipe
                with ctx.preparing_lock:
                    ctx.preparing = False
            with self._lock:  # cancel() decides under the same lock: cancelled, or too late
                if ctx.cancel_requested.is_set():
                    raise JobCancelled()
                write_result(ctx, checkpoints)
                self.table.update(job_uuid, status=JobStatus.completed, completed_at=now(), checkpoints=checkpoints,
                                  progress=self._phase(job_uuid, "completed"))
        except JobInterrupted:
            log.info("job %s stopped for shutdown", job_uuid)  # shutdown() already recorded its state
        except JobCancelled:
            self.discard(ctx.job_dir)
            self.table.update(job_uuid, status=JobStatus.cancelled, completed_at=now(),
                              progress=self._phase(job_uuid, "cancelled"))
        except BaseException as exc:  # noqa: BLE001 - any failure ends this job, never the server
            if ctx.shutdown_requested.is_set():
                return
            log.error("job %s failed:\n%s", job_uuid, traceback.format_exc())
            self.discard(ctx.job_dir)
            self.table.update(job_uuid, status=JobStatus.failed, completed_at=now(), error=_describe(exc),
                              progress=self._phase(job_uuid, "failed"))
            if not isinstance(exc, Exception):
                raise

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
        """A failed or cancelled job keeps its data snapshot (for diagnosis, see sweep_data) but no model."""
        for name in ("checkpoints", "final", "merged", ".final.partial", ".merged.partial", RESULT_FILE):
            path = job_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def sweep_data(self) -> None:
        """Remove the data snapshots of failed and cancelled jobs older than the retention period."""
        keep = timedelta(hours=self.config.failed_job_data_retention_hours)
        cutoff = now() - keep
        output_dir = self.config.resolved_output_dir()
        for record in self.table.all():
            if record.status not in (JobStatus.failed, JobStatus.cancelled) or record.completed_at is None:
                continue
            data = output_dir / record.job_uuid / "data"
            if record.completed_at <= cutoff and data.exists():
                shutil.rmtree(data, ignore_errors=True)
                log.info("job %s: data snapshot removed (%s, retention %s h)", record.job_uuid,
                         record.status.value, self.config.failed_job_data_retention_hours)


def write_result(ctx: JobContext, checkpoints: list[Checkpoint]) -> None:
    """The job's artifacts are complete: say so on disk, so a restart never trains it again even if
    the job store could not record it."""
    path = ctx.job_dir / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"completed_at": time.time(), "checkpoints": [c.model_dump(mode="json") for c in checkpoints]}))
    tmp.replace(path)


def read_result(job_dir) -> list[Checkpoint] | None:
    path = job_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return [Checkpoint.model_validate(c) for c in json.loads(path.read_text())["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "no message"
    if type(exc).__name__ in ("OutOfMemoryError",) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    # safetensors reports ENOSPC as its own error type, so match the OS's message too
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in text:
        return f"disk full while writing: {text}"
    return f"{type(exc).__name__}: {text}"


__all__ = ["Scheduler", "INTERRUPTED", "CRASHED", "read_result"]
