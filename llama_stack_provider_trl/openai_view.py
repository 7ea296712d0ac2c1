"""How a job of the job table looks through OpenAI's fine-tuning API: the job object, its events, its
checkpoints, its results file. Pure functions of the job's record and its metrics history
(history.py), so a job created either way (post_training or /v1/fine_tuning) shows both ways.

Events: created and files validated, paused and resumed are kept in the record (JobRecord.events); the
rest follow from what is kept anyway: started (started_at), one metrics event per logged step
(metrics.jsonl), checkpoint saved (the record's checkpoints), and the end (completed_at and status).
Their ids are stable, so ``after`` pages through them.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from .api.models import JobStatus
from .api.openai_models import (
    CheckpointMetrics,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobError,
    Page,
)
from .jobs import JobRecord
from .recipes.context import latest_checkpoint

ORGANIZATION = "local"
# learning_rate_multiplier multiplies these: TRL's own defaults (SFTConfig 2e-5, DPOConfig 1e-6)
BASE_LEARNING_RATE = {"sft": 2e-5, "dpo": 1e-6}
METHOD_TYPE = {"sft": "supervised", "dpo": "dpo"}

# results-file columns (OpenAI's names) and the metrics.jsonl keys (TRL's names) they come from
COMMON_COLUMNS = {"train_loss": "loss", "valid_loss": "eval_loss", "learning_rate": "learning_rate",
                  "grad_norm": "grad_norm"}
METHOD_COLUMNS = {
    "sft": {"train_mean_token_accuracy": "mean_token_accuracy", "valid_mean_token_accuracy": "eval_mean_token_accuracy",
            "num_tokens": "num_tokens"},
    "dpo": {"train_reward_margin": "rewards/margins", "train_reward_accuracy": "rewards/accuracies",
            "valid_reward_margin": "eval_rewards/margins", "valid_reward_accuracy": "eval_rewards/accuracies"},
}


def unix(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def openai_status(record: JobRecord) -> str:
    if record.status == JobStatus.scheduled:
        return "paused" if record.paused else "queued"
    return {JobStatus.in_progress: "running", JobStatus.completed: "succeeded", JobStatus.failed: "failed",
            JobStatus.cancelled: "cancelled"}[record.status]


def fields(record: JobRecord) -> dict[str, Any]:
    """The OpenAI request fields of a job: as created through /v1/fine_tuning, or read off a post_training
    request (training_file is then its dataset id)."""
    if record.openai is not None:
        return record.openai
    tc = record.request["training_config"]
    data = tc["data_config"]
    epochs, batch, lr = tc["n_epochs"], data["batch_size"], tc["optimizer_config"]["lr"]
    hyper = {"n_epochs": epochs, "batch_size": batch,
             "learning_rate_multiplier": lr / BASE_LEARNING_RATE[record.method]}
    if record.method == "dpo":
        hyper["beta"] = record.request["algorithm_config"].get("beta")
    return {
        "model": record.request.get("finetuned_model") or record.request.get("model") or "",
        "training_file": data["dataset_id"], "validation_file": data.get("validation_dataset_id"),
        "hyperparameters": hyper, "seed": 42 if tc.get("seed") is None else tc["seed"],
        "suffix": None, "metadata": None, "result_files": [],
        "method": {"type": METHOD_TYPE[record.method]},
    }


def fine_tuned_model(record: JobRecord) -> str | None:
    """ft:<base model's name>:<suffix>:<job id>; it names the job's final checkpoint, whose directory
    checkpoints.list shows (path) and post_training's artifacts too."""
    if record.status != JobStatus.completed or not record.checkpoints:
        return None
    f = fields(record)
    base = Path(f["model"].rstrip("/")).name or f["model"]
    return ":".join(["ft", base, *([f["suffix"]] if f.get("suffix") else []), record.job_uuid])


def job_object(record: JobRecord, history: list[dict[str, Any]]) -> FineTuningJob:
    f = fields(record)
    status = openai_status(record)
    method = dict(f["method"])
    hyper = dict(f["hyperparameters"])
    key = method["type"]
    method[key] = {"hyperparameters": hyper}
    error = None
    if record.status == JobStatus.failed:
        error = JobError(code="job_failed", message=record.error or "the job failed", param=None)
    estimated = None
    if status == "running" and record.progress and record.progress.eta_seconds is not None:
        estimated = int(time.time() + record.progress.eta_seconds)
    tokens = [row["num_tokens"] for row in history if "num_tokens" in row]
    return FineTuningJob(
        id=record.job_uuid, created_at=unix(record.scheduled_at), finished_at=unix(record.completed_at),
        error=error, fine_tuned_model=fine_tuned_model(record),
        hyperparameters={k: hyper.get(k) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        model=f["model"], organization_id=ORGANIZATION, result_files=list(f.get("result_files") or []),
        seed=f["seed"], status=status, trained_tokens=int(max(tokens)) if tokens and record.is_final else None,
        training_file=f["training_file"], validation_file=f.get("validation_file"), estimated_finish=estimated,
        integrations=[], metadata=f.get("metadata"), method=method,
    )


# ---- events -----------------------------------------------------------------------------------


def metrics_data(method: str, row: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"step": row["step"]}
    if "total_steps" in row:
        data["total_steps"] = row["total_steps"]
    for column, key in {**COMMON_COLUMNS, **METHOD_COLUMNS[method]}.items():
        if key in row:
            data[column] = row[key]
    return data


def events(record: JobRecord, history: list[dict[str, Any]], job_dir: Path | None = None) -> list[FineTuningJobEvent]:
    """Every event of the job, newest first; with job_dir, also the resumable checkpoint an unfinished job keeps."""
    job = record.job_uuid
    found: list[tuple[float, int, FineTuningJobEvent]] = []

    def add(at: float, event_id: str, message: str, level: str = "info", data: dict | None = None,
            kind: str = "message") -> None:
        found.append((at, len(found), FineTuningJobEvent(id=f"ftevent-{job}-{event_id}", created_at=int(at),
                                                         level=level, message=message, data=data, type=kind)))

    for i, event in enumerate(record.events):
        add(event["created_at"], str(i), event["message"], event.get("level", "info"), event.get("data"))
    if record.started_at is not None:
        add(record.started_at.timestamp(), "started", "Fine-tuning job started")
    for row in history:
        if any(k in row for k in ("loss", "eval_loss")):
            data = metrics_data(record.method, row)
            add(row.get("time", 0.0), f"step-{row['step']}", f"Step {row['step']}/{row.get('total_steps', '?')}: "
                f"training loss={_fmt(row.get('loss'))}" + (f", validation loss={_fmt(row['eval_loss'])}"
                                                             if "eval_loss" in row else ""), data=data, kind="metrics")
    for i, checkpoint in enumerate(record.checkpoints):
        add(checkpoint.created_at.timestamp(), f"checkpoint-{i}", f"Checkpoint saved: {checkpoint.identifier}",
            data={"path": checkpoint.path, "kind": checkpoint.kind})
    kept = latest_checkpoint(job_dir / "checkpoints") if job_dir is not None and not record.is_final else None
    if kept is not None:
        add(kept.stat().st_mtime, f"checkpoint-{kept.name}",
            f"Checkpoint saved at step {kept.name.rsplit('-', 1)[1]} (resumable)", data={"path": str(kept)})
    if record.is_final and record.completed_at is not None:
        at = record.completed_at.timestamp()
        if record.status == JobStatus.completed:
            add(at, "end", "The job has successfully completed")
        elif record.status == JobStatus.failed:
            add(at, "end", f"The job failed: {record.error or 'no reason given'}", level="error")
        else:
            add(at, "end", "The job was cancelled")
    found.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in reversed(found)]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


# ---- checkpoints ------------------------------------------------------------------------------


def checkpoint_metrics(method: str, history: list[dict[str, Any]], step: int) -> CheckpointMetrics:
    """The latest logged training and validation metrics at or before `step`."""
    train = [r for r in history if r["step"] <= step and "loss" in r]
    valid = [r for r in history if r["step"] <= step and "eval_loss" in r]
    metrics = CheckpointMetrics(step=float(step))
    if train:
        metrics.train_loss = train[-1]["loss"]
        metrics.train_mean_token_accuracy = train[-1].get("mean_token_accuracy")
    if valid:
        metrics.valid_loss = metrics.full_valid_loss = valid[-1]["eval_loss"]
        accuracy = valid[-1].get("eval_mean_token_accuracy")
        metrics.valid_mean_token_accuracy = metrics.full_valid_mean_token_accuracy = accuracy
    return metrics


def checkpoints(record: JobRecord, job_dir: Path, history: list[dict[str, Any]]) -> list[FineTuningJobCheckpoint]:
    """The final model (and adapter/merged model) of a finished job and the resumable checkpoint a running
    or paused job keeps, newest first."""
    name = fine_tuned_model(record) or f"ft:{Path(fields(record)['model'].rstrip('/')).name}:{record.job_uuid}"
    found = []
    last_step = history[-1]["step"] if history else 0
    final_step = (record.progress.total_steps if record.progress and record.progress.total_steps else None) or last_step
    for checkpoint in record.checkpoints:
        suffix = "" if checkpoint.kind == "model" else f":{checkpoint.kind}"
        found.append(FineTuningJobCheckpoint(
            id=f"ftckpt-{record.job_uuid}-{Path(checkpoint.path).name}", created_at=unix(checkpoint.created_at),
            fine_tuned_model_checkpoint=f"{name}{suffix}", fine_tuning_job_id=record.job_uuid,
            metrics=checkpoint_metrics(record.method, history, final_step), step_number=final_step,
            path=checkpoint.path, kind=checkpoint.kind))
    if not record.is_final:
        kept = latest_checkpoint(job_dir / "checkpoints")
        if kept is not None:
            step = int(kept.name.rsplit("-", 1)[1])
            found.append(FineTuningJobCheckpoint(
                id=f"ftckpt-{record.job_uuid}-step-{step}", created_at=int(kept.stat().st_mtime),
                fine_tuned_model_checkpoint=f"{name}:ckpt-step-{step}", fine_tuning_job_id=record.job_uuid,
                metrics=checkpoint_metrics(record.method, history, step), step_number=step, path=str(kept)))
    found.sort(key=lambda c: (c.created_at, c.step_number), reverse=True)
    return found


# ---- results file -----------------------------------------------------------------------------


def results_csv(method: str, history: list[dict[str, Any]]) -> str:
    """One row per logged step, like OpenAI's results file; an empty cell where a step logged no such value."""
    columns = {"step": "step", "epoch": "epoch", **COMMON_COLUMNS, **METHOD_COLUMNS[method]}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in history:
        writer.writerow(["" if row.get(key) is None else row[key] for key in columns.values()])
    return out.getvalue()


# ---- pages ------------------------------------------------------------------------------------


def page(items: list[Any], after: str | None, limit: int, what: str) -> Page:
    """OpenAI's list page: the items after the one whose id is `after` (a 404 when it is no such item)."""
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            from llama_stack_api.common.errors import ResourceNotFoundError

            raise ResourceNotFoundError(after, what)
        start = ids.index(after) + 1
    chunk = items[start:start + limit]
    return Page(data=chunk, has_more=start + limit < len(items),
                first_id=chunk[0].id if chunk else None, last_id=chunk[-1].id if chunk else None)


__all__ = ["openai_status", "job_object", "events", "checkpoints", "results_csv", "page", "fine_tuned_model",
           "BASE_LEARNING_RATE"]
