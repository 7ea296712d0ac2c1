"""OpenAI's fine-tuning API on the provider's own job table.

A create request becomes the post_training request it means (SupervisedFineTuneRequest or
PreferenceOptimizeRequest), so it goes through the same validation, plan, limits and scheduler as any
job, and a job created either way is listed, watched and cancelled either way. What OpenAI adds (suffix,
seed, metadata, resolved hyperparameters, the files as given) is kept in the job's record
(JobRecord.openai). Jobs are reached only through the provider's _job/_jobs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

from llama_stack_api.common.errors import ConflictError

from . import history
from .api.models import JobStatus, PreferenceOptimizeRequest, SupervisedFineTuneRequest
from .api.openai_models import CreateFineTuningJobRequest, FineTuningJob, Page
from .data import DataError, check_strings, is_local_file_reference, load_rows
from .openai_data import Rows, dpo_training_rows, parse_jsonl, sft_training_rows
from .openai_view import BASE_LEARNING_RATE, checkpoints, events, job_object, page, results_csv

if TYPE_CHECKING:
    from .jobs import JobRecord
    from .post_training import TrlPostTrainingImpl

log = logging.getLogger(__name__)

AUTO_EPOCHS = 3  # OpenAI's usual choice for small files
MAX_AUTO_BATCH = 256
RESULTS_FILE = "results.csv"
RESULTS_PURPOSE = "assistants"  # Llama Stack 0.7.3's Files API takes assistants or batch, not fine-tune


def auto_batch_size(n_rows: int) -> int:
    """About 0.2% of the rows, 1 to 256, as OpenAI's auto does."""
    return max(1, min(MAX_AUTO_BATCH, round(n_rows * 0.002)))


class OpenAIFineTuning:
    def __init__(self, provider: TrlPostTrainingImpl) -> None:
        self.provider = provider
        self._results_lock = asyncio.Lock()

    # ---- create ---------------------------------------------------------------------------

    async def create(self, request: CreateFineTuningJobRequest) -> FineTuningJob:
        p = self.provider
        for key, value in request.model_dump(mode="python").items():
            check_strings(value, key, name_path=True)  # kept in the job's record, stored as UTF-8 JSON
        method = request.method.type if request.method else "supervised"
        settings = request.method.dpo if method == "dpo" else (request.method.supervised if request.method else None)
        hyper = (settings.hyperparameters if settings else None) or request.hyperparameters
        given = hyper.model_dump(exclude_none=True) if hyper else {}

        train = await self._read(request.training_file, "training_file")
        validation = await self._read(request.validation_file, "validation_file") if request.validation_file else None
        convert = dpo_training_rows if method == "dpo" else sft_training_rows
        train_rows, validation_rows = await asyncio.to_thread(convert, train, validation)

        n_rows = len(train_rows)
        resolved = {
            "n_epochs": _given(given, "n_epochs", AUTO_EPOCHS),
            "batch_size": _given(given, "batch_size", auto_batch_size(n_rows)),
            "learning_rate_multiplier": _given(given, "learning_rate_multiplier", 1.0),
        }
        internal = "dpo" if method == "dpo" else "sft"
        if method == "dpo":
            resolved["beta"] = _given(given, "beta", p.config.dpo_beta)
        lr = BASE_LEARNING_RATE[internal] * resolved["learning_rate_multiplier"]
        if lr > 1.0:
            raise ValueError(f"hyperparameters.learning_rate_multiplier: {resolved['learning_rate_multiplier']} times "
                             f"the base learning rate {BASE_LEARNING_RATE[internal]} is {lr}, above 1")
        seed = request.seed if request.seed is not None else random.randrange(2**31)
        job_uuid = f"ftjob-{uuid.uuid4().hex[:24]}"
        batch = resolved["batch_size"]
        training_config = {
            "n_epochs": resolved["n_epochs"],
            "max_steps_per_epoch": -(-n_rows // batch),  # every row, every epoch
            "max_validation_steps": None,  # the whole validation file
            "seed": seed,
            "data_config": {"dataset_id": request.training_file, "batch_size": batch, "shuffle": True,
                            "validation_dataset_id": request.validation_file},
            "optimizer_config": {"lr": lr},
        }
        now_ts = time.time()
        record_fields = {"openai": {
            "model": request.model, "training_file": request.training_file,
            "validation_file": request.validation_file, "suffix": request.suffix, "seed": seed,
            "metadata": request.metadata, "hyperparameters": resolved, "method": {"type": method},
            "result_files": [],
        }, "events": [
            {"created_at": now_ts, "level": "info", "message": f"Created fine-tuning job: {job_uuid}"},
            {"created_at": now_ts, "level": "info", "message": f"Files validated: {n_rows} training rows"
             + (f", {len(validation_rows)} validation rows" if validation_rows else ""),
             "data": {"training_rows": n_rows, "validation_rows": len(validation_rows or [])}},
        ]}

        rows = {request.training_file: train_rows}
        if request.validation_file:
            rows[request.validation_file] = validation_rows

        async def rows_for(dataset_id: str, field: str) -> list[dict]:
            return rows[dataset_id]

        try:
            if method == "dpo":
                internal_request = PreferenceOptimizeRequest.model_validate({
                    "job_uuid": job_uuid, "finetuned_model": request.model, "training_config": training_config,
                    "algorithm_config": {"beta": resolved["beta"]}})
                await p.preference_optimize(internal_request, rows_for=rows_for, record_fields=record_fields)
            else:
                internal_request = SupervisedFineTuneRequest.model_validate({
                    "job_uuid": job_uuid, "model": request.model, "training_config": training_config})
                await p.supervised_fine_tune(internal_request, rows_for=rows_for, record_fields=record_fields)
        except (ValueError, PermissionError) as exc:  # name the fields the client sent
            kind = PermissionError if isinstance(exc, PermissionError) else ValueError
            raise kind(_openai_field_names(str(exc))) from None
        return await self.retrieve(job_uuid)

    async def _read(self, ref: str, field: str) -> Rows:
        """A Files API file (JSONL, any purpose), else a registered dataset or a local file (data.py)."""
        p = self.provider
        limit = p.config.limits.max_dataset_rows
        if p.files is not None and ref.startswith("file-") and not is_local_file_reference(ref):
            from llama_stack_api.files.models import RetrieveFileContentRequest

            try:
                response = await p.files.openai_retrieve_file_content(RetrieveFileContentRequest(file_id=ref))
            except Exception as exc:  # noqa: BLE001 - not found, or unreadable: the field is wrong either way
                raise DataError(f"{field}: no readable file '{ref}' in the Files API ({exc})") from None
            return await asyncio.to_thread(parse_jsonl, field, bytes(response.body), limit)
        rows = await load_rows(ref, field=field, datasetio=p.datasetio, datasets=p.datasets,
                               roots=p.config.dataset_roots, max_rows=limit)
        return Rows(field, rows)

    # ---- reads ----------------------------------------------------------------------------

    def _history(self, record: JobRecord) -> list[dict[str, Any]]:
        return history.read(self.provider.output_dir / record.job_uuid)

    def _shown(self, record: JobRecord) -> JobRecord:
        """The record as the caller sees it: with authentication its job_uuid is an owner-scoped key (for the
        table, the scheduler and the job's directory), shown to its owner as the id they know."""
        return record.model_copy(update={"job_uuid": self.provider._shown_id(record)})

    async def retrieve(self, job_id: str) -> FineTuningJob:
        record = self.provider._job(job_id)
        record = await self._with_results(record)
        return job_object(self._shown(record), self._history(record))

    async def list(self, after: str | None, limit: int, metadata: dict[str, str]) -> Page:
        records = [r for r in reversed(self.provider._jobs())  # newest first
                   if all(((r.openai or {}).get("metadata") or {}).get(k) == v for k, v in metadata.items())]
        jobs = [job_object(self._shown(r), self._history(r)) for r in [await self._with_results(r) for r in records]]
        return page(jobs, after, limit, "Fine-tuning job")

    async def list_events(self, job_id: str, after: str | None, limit: int) -> Page:
        record = self.provider._job(job_id)
        found = events(self._shown(record), self._history(record), self.provider.output_dir / record.job_uuid)
        return page(found, after, limit, "Fine-tuning event")

    async def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> Page:
        record = self.provider._job(job_id)
        found = checkpoints(self._shown(record), self.provider.output_dir / record.job_uuid, self._history(record))
        return page(found, after, limit, "Fine-tuning checkpoint")

    # ---- changes --------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> FineTuningJob:
        await self.provider.cancel_training_job(job_id)
        return await self.retrieve(job_id)

    async def pause(self, job_id: str) -> FineTuningJob:
        key = self.provider._job(job_id, "update").job_uuid
        outcome = self.provider.scheduler.pause(key)
        if outcome not in ("paused", "pausing"):
            raise ConflictError(f"fine-tuning job '{job_id}' is {outcome}; only queued or running jobs can be paused")
        return await self.retrieve(job_id)

    async def resume(self, job_id: str) -> FineTuningJob:
        record = self.provider._job(job_id, "update")
        if not self.provider.scheduler.resume(record.job_uuid):
            raise ConflictError(f"fine-tuning job '{job_id}' is not paused ({job_object(record, []).status}); "
                                "only paused jobs can be resumed")
        return await self.retrieve(job_id)

    # ---- results file ---------------------------------------------------------------------

    async def _with_results(self, record: JobRecord) -> JobRecord:
        """A succeeded OpenAI job's results file: written from its history when first asked for, and stored in
        the Files API when the stack has one (result_files lists its id)."""
        if record.openai is None or record.status != JobStatus.completed or record.openai.get("result_files"):
            return record
        if self.provider.files is None:
            return record
        async with self._results_lock:
            record = self.provider._job(record.job_uuid)
            if record.openai.get("result_files"):
                return record
            job_dir = self.provider.output_dir / record.job_uuid
            text = results_csv(record.method, self._history(record))
            await asyncio.to_thread((job_dir / RESULTS_FILE).write_text, text)
            try:
                file_id = await self._upload(f"{record.job_uuid}-{RESULTS_FILE}", text.encode())
            except Exception:  # noqa: BLE001 - the job stays readable; the next read tries again
                log.exception("job %s: storing its results file in the Files API failed", record.job_uuid)
                return record
            fields = {**record.openai, "result_files": [file_id]}
            self.provider.table.update(record.job_uuid, openai=fields)
            return self.provider._job(record.job_uuid)

    async def _upload(self, name: str, content: bytes) -> str:
        from llama_stack_api.common.upload_safety import PreReadUploadFile
        from llama_stack_api.files.models import UploadFileRequest

        uploaded = await self.provider.files.openai_upload_file(
            UploadFileRequest(purpose=RESULTS_PURPOSE), PreReadUploadFile(content, filename=name,
                                                                          content_type="text/csv"))
        return uploaded.id


def _given(given: dict[str, Any], key: str, auto: Any) -> Any:
    value = given.get(key, "auto")
    return auto if value == "auto" else value


# internal request fields an OpenAI client never sent, as the OpenAI fields that set them
FIELD_NAMES = (
    ("training_config.data_config.batch_size", "hyperparameters.batch_size"),
    ("training_config: n_epochs", "hyperparameters.n_epochs"),
    ("training_config.data_config.dataset_id", "training_file"),
    ("training_config.data_config.validation_dataset_id", "validation_file"),
    ("finetuned_model", "model"),
)


def _openai_field_names(message: str) -> str:
    for internal, openai in FIELD_NAMES:
        message = message.replace(internal, openai)
    return message


__all__ = ["OpenAIFineTuning", "auto_batch_size", "AUTO_EPOCHS", "RESULTS_PURPOSE"]
