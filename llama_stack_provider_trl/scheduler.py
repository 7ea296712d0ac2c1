"""One training thread, one job at a time, in submission order.

A plain daemon thread rather than an asyncio task: Llama Stack initialises
providers in a throwaway event loop, and training must not stall the server's
loop anyway. The thread pulls job ids from a FIFO queue; cancel and shutdown
reach the running job through events its TrainerCallback checks every step.
"""

from __future__ import annotations

import errno
import importlib
import logging
import queue
import shutil
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .api.models import JobStatus, TrainingProgress
from .config import TrlPostTrainingConfig
from .jobs import JobRecord, JobTable, now
from .plan import TrainingPlan
from .recipes.context import JobCancelled, JobContext, JobInterrupted, latest_checkpoint

log = logging.getLogger(__name__)

RECIPES = {"dpo": "llama_stack_provider_trl.recipes.dpo", "sft": "llama_stack_provider_trl.recipes.sft"}
INTERRUPTED = "interrupted by server shutdown"


class Scheduler:
    def __init__(self, table: JobTable, config: TrlPostTrainingConfig,
                 plan_for: Callable[[JobRecord], TrainingPlan]) -> None:
        self.table = table
        self.config = config
        self.plan_for = plan_for
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the scheduled -> in_progress/cancelled transitions
        self._current: JobContext | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="trl-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job_uuid: str) -> None:
        self._queue.put(job_uuid)

    # ---- cancel / shutdown (called from the server's event loop) ----------------------------

    def cancel(self, job_uuid: str) -> JobStatus:
        """Cancel a waiting job at once, or ask the running one to stop; returns the status now."""
        with self._lock:
            record = self.table.snapshot(job_uuid)
            if record.status == JobStatus.scheduled:
                self.table.update(job_uuid, status=JobStatus.cancelled, completed_at=now())
                return JobStatus.cancelled
            current = self._current
            if record.status == JobStatus.in_progress and current is not None and current.job_uuid == job_uuid:
                current.cancel_requested.set()
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
            if not self.config.resume_interrupted_jobs:
                for record in self.table.all():
                    if record.status == JobStatus.scheduled:
                        self.table.update(record.job_uuid, status=JobStatus.failed, error=INTERRUPTED, completed_at=now())
        self._queue.put(None)
        self._thread.join(timeout)

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
        while True:
            job_uuid = self._queue.get()
            if job_uuid is None:
                return
            with self._lock:
                if self._stopping:
                    return
                record = self.table.snapshot(job_uuid)
                if record.status != JobStatus.scheduled:
                    continue  # cancelled while waiting
                ctx = self._context(record)
                self._current = ctx
                self.table.update(job_uuid, status=JobStatus.in_progress, started_at=record.started_at or now(),
                                  progress=TrainingProgress(phase="starting", total_steps=ctx.plan.max_steps,
                                                            step=record.progress.step if record.progress else 0))
            try:
                self._train(ctx, record)
            finally:
                with self._lock:
                    self._current = None

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
            recipe = importlib.import_module(RECIPES[record.method])
            checkpoints = recipe.train(ctx)
        except JobInterrupted:
            log.info("job %s stopped for shutdown", job_uuid)  # shutdown() already recorded its state
            return
        except JobCancelled:
            self._discard(ctx)
            self.table.update(job_uuid, status=JobStatus.cancelled, completed_at=now(),
                              progress=self._phase(job_uuid, "cancelled"))
            return
        except BaseException as exc:  # noqa: BLE001 - any failure ends this job, never the server
            if ctx.shutdown_requested.is_set():
                return
            log.error("job %s failed:\n%s", job_uuid, traceback.format_exc())
            self._discard(ctx)
            self.table.update(job_uuid, status=JobStatus.failed, completed_at=now(), error=_describe(exc),
                              progress=self._phase(job_uuid, "failed"))
            if not isinstance(exc, Exception):
                raise
            return
        self.table.update(job_uuid, status=JobStatus.completed, completed_at=now(), checkpoints=checkpoints,
                          progress=self._phase(job_uuid, "completed"))

    def _phase(self, job_uuid: str, phase: str) -> TrainingProgress:
        progress = self.table.snapshot(job_uuid).progress or TrainingProgress()
        return progress.model_copy(update={"phase": phase, "eta_seconds": None})

    @staticmethod
    def _discard(ctx: JobContext) -> None:
        """A failed or cancelled job keeps its data snapshot (for diagnosis) but no checkpoints."""
        for name in ("checkpoints", "final", "merged", ".final.partial", ".merged.partial"):
            shutil.rmtree(ctx.job_dir / name, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "no message"
    if type(exc).__name__ in ("OutOfMemoryError",) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    # safetensors reports ENOSPC as its own error type, so match the OS's message too
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in text:
        return f"disk full while writing: {text}"
    return f"{type(exc).__name__}: {text}"


__all__ = ["Scheduler", "INTERRUPTED"]
