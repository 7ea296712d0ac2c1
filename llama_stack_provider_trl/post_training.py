"""The inline::trl provider: validates requests, keeps the job table, hands jobs to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from llama_stack_api.common.errors import ConflictError

from .api.models import (
    JobStatus,
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    PreferenceOptimizeRequest,
    QATFinetuningConfig,
    SupervisedFineTuneRequest,
    TrainingConfig,
)
from .access import JobAccess
from .config import TrlPostTrainingConfig
from .data import (
    check_strings,
    DataError,
    hold_out,
    load_rows,
    preference_format,
    preference_rows,
    require_kind,
    resolve_inside,
    sft_format,
    sft_rows,
    write_jsonl,
)
from .executors import make_executor
from .hardware import training_device
from .jobs import FINAL_STATES, JobNotFoundError, JobRecord, JobTable, now
from .lora_targets import SafetensorsError, linear_modules, lora_target_modules
from .openai_ft import OpenAIFineTuning
from .plan import TrainingPlan, check_memory_limits, make_plan
from .scheduler import CRASHED, INTERRUPTED, Scheduler, read_result

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SHUTDOWN_BUDGET_S = 4.5  # Llama Stack gives each provider 5 s to shut down
# Directories in output_dir that are not jobs: the hub download cache (recipes/common.py), and where
# start-up sets aside job directories that have no record.
NOT_JOBS = ("hub-cache", ".orphaned")
SEQUENCES_PER_ROW = {"dpo": 2, "sft": 1}  # DPO trains on chosen and rejected
RowsFor = Callable[[str, str], Awaitable[list[dict]]]  # (dataset_id, field) -> the job's rows, checked


class TrlPostTrainingImpl:
    def __init__(self, config: TrlPostTrainingConfig, datasetio: Any = None, datasets: Any = None,
                 files: Any = None, policy: list[Any] | None = None) -> None:
        self.config = config
        self.access = JobAccess(policy)  # who may see and act on which job (access.py)
        self.datasetio = datasetio
        self.datasets = datasets
        self.files = files  # the Files API, when the stack has one: OpenAI training files and results files
        self.output_dir = config.resolved_output_dir()
        self.max_request_bytes = config.limits.max_request_bytes  # read by the routes
        self.table: JobTable | None = None
        self.scheduler: Scheduler | None = None
        self.fine_tuning = OpenAIFineTuning(self)  # /v1/fine_tuning/jobs, on this same job table

    async def initialize(self) -> None:
        from llama_stack.core.storage.kvstore import kvstore_impl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.table = JobTable(await kvstore_impl(self.config.kvstore))
        records = await self.table.load()
        self._set_aside_orphans({r.job_uuid for r in records})
        executor = make_executor(self.config)
        gpus = executor.devices()
        if gpus != ["cpu"] and self.config.processes_per_job > len(gpus):
            raise ValueError(f"processes_per_job: {self.config.processes_per_job} processes need as many GPUs, and "
                             f"this machine shows {len(gpus)} ({', '.join(gpus)})")
        self.scheduler = Scheduler(self.table, self.config, self._plan_for, executor)
        for record in records:
            if not record.is_final:
                self._recover(record)
        self.scheduler.start()

    def _recover(self, record: JobRecord) -> None:
        """A job that was waiting or running when the server stopped: finished, resumed or failed."""
        job_uuid = record.job_uuid
        checkpoints = read_result(self.output_dir / job_uuid)
        if checkpoints is not None:  # its artifacts were complete; only the record missed it
            self.table.update(job_uuid, status=JobStatus.completed, checkpoints=checkpoints,
                              completed_at=record.completed_at or now(),
                              warnings=[*record.warnings, "completed before the server stopped; recorded at restart"])
            return
        if record.paused:
            return  # waits for a resume, restart or not
        if not self.config.resume_interrupted_jobs:
            self.table.update(job_uuid, status=JobStatus.failed, error=INTERRUPTED, completed_at=now())
            return
        if record.status == JobStatus.in_progress:
            # a clean shutdown sets a running job back to scheduled: this one was running when the server died
            crashes = record.crashes + 1
            if crashes > self.config.max_resumes_after_crash:
                Scheduler.discard(self.output_dir / job_uuid)
                self.table.update(job_uuid, status=JobStatus.failed, crashes=crashes, completed_at=now(),
                                  error=f"{CRASHED}; not resumed again after {record.attempts} attempt(s) "
                                        f"(the provider's max_resumes_after_crash is {self.config.max_resumes_after_crash})")
                return
            self.table.update(job_uuid, status=JobStatus.scheduled, crashes=crashes,
                              warnings=[*record.warnings, f"{CRASHED}; resuming, attempt {record.attempts + 1}"])
        self.scheduler.submit(job_uuid)

    def _set_aside_orphans(self, known: set[str]) -> None:
        """Job directories without a record (the server was killed while accepting the job) would make
        their id a 409 forever: move them to output_dir/.orphaned, where nothing is lost."""
        aside = self.output_dir / ".orphaned"
        for child in self.output_dir.iterdir():
            if child.name in known or child.name in NOT_JOBS or child.name.startswith(".") or not child.is_dir():
                continue
            target = aside / child.name
            if target.exists():
                target = aside / f"{child.name}.{int(time.time())}"
            aside.mkdir(exist_ok=True)
            child.rename(target)
            log.warning("job directory %s has no job record: moved to %s", child, target)

    async def shutdown(self) -> None:
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.shutdown, SHUTDOWN_BUDGET_S)
        if self.table is not None:
            self.table.close()

    # ---- requests ---------------------------------------------------------------------------

    async def preference_optimize(self, request: PreferenceOptimizeRequest, rows_for: RowsFor | None = None,
                                  record_fields: dict[str, Any] | None = None) -> PostTrainingJob:
        """rows_for and record_fields: for the OpenAI routes, which read and convert the rows themselves."""
        warnings = request.algorithm_config.ignored_fields()
        model_dir = self._check_model(request.finetuned_model, "finetuned_model")
        if model_dir is not None:  # the job uses the directory checked now, whatever a symlink says later
            request = request.model_copy(update={"finetuned_model": str(model_dir)})
        if request.algorithm_config.lora is not None:
            if request.algorithm_config.lora.quantize_base:
                self._check_quantize_base()
            self._check_lora(model_dir, request.algorithm_config.lora, "algorithm_config.lora")

        async def dpo_rows(dataset_id: str, field: str) -> list[dict]:
            return await self._rows(dataset_id, field, lambda rows: preference_rows(rows, preference_format(rows, field)))

        return await self._submit("dpo", request, request.training_config, rows_for or dpo_rows, warnings,
                                  record_fields=record_fields)

    async def supervised_fine_tune(self, request: SupervisedFineTuneRequest, rows_for: RowsFor | None = None,
                                   record_fields: dict[str, Any] | None = None) -> PostTrainingJob:
        """rows_for and record_fields: for the OpenAI routes, which read and convert the rows themselves (and
        hold out no validation rows: OpenAI validates only on a validation_file)."""
        model = request.model or self.config.default_model
        if not model:
            raise ValueError("model: required (the provider has no default_model)")
        model_dir = self._check_model(model, "model")
        algo = request.algorithm_config
        if isinstance(algo, QATFinetuningConfig):
            raise ValueError("algorithm_config: QAT is not supported by this provider; use LoRA or none")
        if algo is not None:
            if algo.quantize_base:
                self._check_quantize_base()
            self._check_lora(model_dir, algo, "algorithm_config")
        warnings = ["checkpoint_dir ignored: artifacts are written under the provider's output_dir"] \
            if request.checkpoint_dir else []
        declared = request.training_config.data_config.data_format
        formats: list[str] = []  # the training set's, which the validation set must share

        async def sft_rows_for(dataset_id: str, field: str) -> list[dict]:
            def check(rows: list[dict]) -> list[dict]:
                fmt = sft_format(rows, field, declared.value if declared else (formats[0] if formats else None))
                formats.append(fmt)
                return sft_rows(rows, fmt)

            return await self._rows(dataset_id, field, check)

        # the job uses the directory checked now, whatever a symlink says later
        resolved = request.model_copy(update={"model": str(model_dir) if model_dir is not None else model})
        return await self._submit("sft", resolved, request.training_config, rows_for or sft_rows_for, warnings,
                                  hold_out_fraction=0.0 if rows_for else self.config.validation_fraction,
                                  record_fields=record_fields)

    async def _submit(self, method: str, request: Any, tc: TrainingConfig, rows_for, warnings: list[str],
                      hold_out_fraction: float = 0.0, record_fields: dict[str, Any] | None = None) -> PostTrainingJob:
        assert self.table is not None and self.scheduler is not None
        job_uuid = request.job_uuid
        check_storable(request)
        check_memory_limits(tc, self.config, SEQUENCES_PER_ROW[method])
        owner = self.access.caller()
        self.access.check("create", job_uuid, owner, owner)
        # 409 for a duplicate of the caller's own, 429 for a full queue, before any work; with authentication
        # `key` is the id scoped by its owner (access.choose_key)
        limits = self.config.limits
        key = self.table.reserve(job_uuid, max_active=limits.max_queued_jobs, owner=owner.principal if owner else None,
                                 max_per_owner=limits.max_active_jobs_per_user)
        job_dir = self.output_dir / key
        created = False
        try:
            if job_dir.exists() or key in NOT_JOBS:
                raise ConflictError(f"job_uuid '{job_uuid}': {job_dir} already exists from an earlier job; choose another id")
            if request.hyperparam_search_config:
                warnings.append("hyperparam_search_config ignored: no hyperparameter search")
            if request.logger_config:
                warnings.append("logger_config ignored: progress is reported in the job's status")
            data_config = tc.data_config
            train = await rows_for(data_config.dataset_id, "training_config.data_config.dataset_id")
            validation = None
            if data_config.validation_dataset_id:
                validation = await rows_for(data_config.validation_dataset_id,
                                            "training_config.data_config.validation_dataset_id")
            elif hold_out_fraction > 0:
                # split here, not in the job, so the plan counts the rows actually trained on
                n_rows = len(train)
                train, validation = await asyncio.to_thread(hold_out, train, hold_out_fraction)
                if validation:
                    warnings.append(f"validation: {len(validation)} of {n_rows} training rows held out "
                                    f"(the provider's validation_fraction, {hold_out_fraction})")
                else:
                    warnings.append(f"validation: none, {n_rows} training row(s) are too few to hold any out")
                    validation = None
            plan = make_plan(tc, len(train), self.config)
            warnings.extend(plan.warnings)

            created = True
            await asyncio.to_thread(self._write_snapshot, job_dir, train, validation)
            record = JobRecord(job_uuid=key, method=method, request=request.model_dump(mode="json"),
                               warnings=warnings, n_rows=len(train), owner=owner, **(record_fields or {}))
            await self.table.add(record)  # 503 if the store refuses it; the job then exists nowhere
        except BaseException:
            self.table.release(key)
            if created:
                shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self.scheduler.submit(key)
        return PostTrainingJob(job_uuid=job_uuid)

    # Every route reaches jobs through these two, so who may see which job is decided in one place.
    # A job the caller may not read answers exactly like an unknown one (the same 404), so ids reveal nothing.
    def _job(self, job_uuid: str, action: str = "read") -> JobRecord:
        """The job the caller knows by this id (a copy; its job_uuid is the internal key, for the table,
        the scheduler and its directory). JobNotFoundError (404) if there is none the caller may read;
        AccessDeniedError (403) if they may read it but the policy refuses `action` (update: cancel, pause,
        resume; delete)."""
        user = self.access.caller()
        record = None
        for key in self.access.candidate_keys(job_uuid, user):
            try:
                record = self.table.snapshot(key)
                break
            except JobNotFoundError:
                continue
        if record is None or not self.access.allowed("read", record.job_uuid, record.owner, user):
            raise JobNotFoundError(job_uuid)
        if action != "read":
            self.access.check(action, record.job_uuid, record.owner, user)
        return record

    def _jobs(self) -> list[JobRecord]:
        """The jobs the caller may read, in submission order (copies)."""
        user = self.access.caller()
        return [r for r in self.table.all() if self.access.allowed("read", r.job_uuid, r.owner, user)]

    def _shown_id(self, record: JobRecord) -> str:
        """The id a job is shown by to the caller: the one they chose for their own, else its unique key."""
        return self.access.shown_id(record.job_uuid, record.owner, self.access.caller())

    async def get_training_jobs(self) -> ListPostTrainingJobsResponse:
        return ListPostTrainingJobsResponse(data=[PostTrainingJob(job_uuid=self._shown_id(r)) for r in self._jobs()])

    async def get_training_job_status(self, job_uuid: str) -> PostTrainingJobStatusResponse:
        record = self._job(job_uuid)
        return record.status_response(self._shown_id(record))

    async def get_training_job_artifacts(self, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        record = self._job(job_uuid)
        return record.artifacts_response(self._shown_id(record))

    async def cancel_training_job(self, job_uuid: str) -> None:
        key = self._job(job_uuid, "update").job_uuid
        status = self.scheduler.cancel(key)
        if status in FINAL_STATES and status != JobStatus.cancelled:
            raise ConflictError(f"job '{job_uuid}' already {status.value}; only scheduled or running jobs can be "
                                "cancelled (the cancel came too late)")

    async def delete_training_job(self, job_uuid: str) -> None:
        """A finished job's record, then its files (a directory left by a failure here is set aside at start-up)."""
        key = self._job(job_uuid, "delete").job_uuid
        await self.table.delete(key)
        await asyncio.to_thread(shutil.rmtree, self.output_dir / key, True)

    # ---- checks -----------------------------------------------------------------------------

    def _plan_for(self, record: JobRecord) -> TrainingPlan:
        """The job's plan under the provider's config now (it may have changed since the job was accepted);
        raises, failing that job alone, when the job can no longer run as it was accepted."""
        tc = TrainingConfig.model_validate(record.request["training_config"])
        check_memory_limits(tc, self.config, SEQUENCES_PER_ROW[record.method])
        snapshot = self.output_dir / record.job_uuid / "data" / "train.jsonl"
        if not snapshot.is_file():
            raise FileNotFoundError(f"the job's data snapshot {snapshot} is gone")
        model = record.request.get("finetuned_model") or record.request.get("model")
        if model and Path(model).is_absolute():
            checked = Path(model)
            if checked.resolve() != checked:
                raise PermissionError(f"the model directory {checked} now resolves to {checked.resolve()}: "
                                      "a symlink on its path changed after the job was accepted; submit it again")
            resolve_inside(model, self.config.model_roots, "model")
            if not (checked / "config.json").is_file():
                raise FileNotFoundError(f"the model directory {checked} is gone (no config.json)")
        return make_plan(tc, record.n_rows, self.config)

    async def _rows(self, dataset_id: str, field: str, check: Callable[[list[dict]], list[dict]]) -> list[dict]:
        """Read, then check and convert the rows in a worker thread: a big dataset takes seconds to
        check, and on the event loop every route (health included) would wait for it."""
        rows = await load_rows(dataset_id, field=field, datasetio=self.datasetio, datasets=self.datasets,
                               roots=self.config.dataset_roots, max_rows=self.config.limits.max_dataset_rows)
        return await asyncio.to_thread(check, rows)

    @staticmethod
    def _write_snapshot(job_dir: Path, train: list[dict], validation: list[dict] | None) -> None:
        write_jsonl(train, job_dir / "data" / "train.jsonl")
        if validation is not None:
            write_jsonl(validation, job_dir / "data" / "validation.jsonl")

    def _check_model(self, value: str, field: str) -> Path | None:
        """A local model directory inside model_roots (returned), or a hub id (None) for the job to fetch."""
        looks_like_path = value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
        if not looks_like_path:
            if not HUB_ID.match(value):
                raise ValueError(f"{field}: '{value}' is neither a local model directory nor a Hugging Face hub id")
            return None
        path = resolve_inside(value, self.config.model_roots, field)
        if not path.is_dir():
            raise DataError(f"{field}: no model directory at {path}")
        if not (path / "config.json").is_file():
            raise DataError(f"{field}: {path} has no config.json; is it a Hugging Face model directory?")
        for entry in path.iterdir():
            # the job would open these (weights, tokenizer files): a FIFO there would block it for good
            require_kind(entry, field, str(entry), "any")
        return path

    def _check_lora(self, model_dir: Path | None, lora, field: str) -> None:
        if model_dir is None:
            return  # hub models are checked when the job loads them
        try:
            available = linear_modules(model_dir)
        except SafetensorsError as exc:
            raise DataError(f"{field}: {exc}") from None
        if available:
            try:
                lora_target_modules(lora, available)
            except ValueError as exc:
                raise ValueError(str(exc).replace("algorithm_config", field, 1)) from None

    def _check_quantize_base(self) -> None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("algorithm_config.quantize_base: QLoRA needs the bitsandbytes package, which is not installed")
        if training_device(self.config.device) != "cuda":
            raise ValueError("algorithm_config.quantize_base: QLoRA needs a CUDA device, and this provider trains "
                             f"on the CPU (device: {self.config.device})")


def check_storable(request: Any) -> None:
    """The job store keeps requests as UTF-8 JSON: a lone surrogate (\\ud800, say) cannot be stored,
    so it is a 400 naming the field before any work, not a failure after the job was accepted."""
    for key, value in request.model_dump(mode="python").items():
        check_strings(value, key, name_path=True)
