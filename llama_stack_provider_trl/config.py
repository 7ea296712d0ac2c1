"""Configuration of the inline::trl provider (the `config:` block of run.yaml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from llama_stack.core.storage.datatypes import KVStoreReference
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Limits(BaseModel):
    """Upper bounds a request may ask for; anything above is a 400 before any work starts."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_dataset_rows: int = Field(default=1_000_000, ge=1, description="Most rows a training or validation set may have.")
    max_seq_length: int = Field(default=32768, ge=8, description="Largest max_seq_length a request may ask for.")
    max_total_steps: int = Field(default=1_000_000, ge=1, description="Most optimizer steps one job may run.")
    max_batch_size: int = Field(default=256, ge=1, description="Largest data_config.batch_size (rows per device step).")
    max_tokens_per_step: int = Field(
        default=131072, ge=8,
        description="Largest batch_size x max_seq_length (x 2 for DPO, which holds chosen and rejected): the tokens "
        "one device step may hold, which is what bounds a job's activation memory.",
    )
    max_queued_jobs: int = Field(default=100, ge=1, description="Most jobs waiting or running at once (429 beyond).")
    max_active_jobs_per_user: int | None = Field(
        default=None, ge=1,
        description="Most jobs one authenticated principal may have waiting or running at once (429 beyond), so one "
        "user cannot fill the queue for everyone. Absent: no per-user limit. Without authentication every job is "
        "the anonymous user's, so this acts as a second max_queued_jobs.",
    )


class TrlPostTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda", "auto"] = Field(
        default="auto", description="Where jobs train: cpu, cuda, or auto (cuda when available)."
    )
    dpo_beta: float = Field(default=0.1, gt=0, description="DPO beta used when a request gives none.")
    use_reference_model: bool = Field(
        default=True,
        description="Keep a frozen reference model during DPO. false: the reference log-probs are computed once "
        "before training (TRL's precompute_ref_log_probs) and no reference model stays in memory.",
    )
    max_seq_length: int = Field(default=2048, ge=8, description="Token limit per sequence when a request gives none.")
    gradient_checkpointing: bool = Field(
        default=False, description="Trade compute for activation memory; a request's efficiency_config overrides it."
    )
    logging_steps: int = Field(default=10, ge=1, description="Steps between logged loss/metrics (status updates).")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Warm-up fraction when a request gives no num_warmup_steps.")
    weight_decay: float = Field(default=0.01, ge=0, description="Weight decay when a request gives none.")

    output_dir: str = Field(
        default="~/.llama/post_training/trl",
        description="Where each job writes its data snapshot, checkpoints and final model (<output_dir>/<job_uuid>).",
    )
    kvstore: KVStoreReference = Field(
        default_factory=lambda: KVStoreReference(backend="kv_default", namespace="post_training::trl"),
        description="Where job records are persisted (a backend declared under run.yaml storage:).",
    )
    save_steps: int = Field(default=50, ge=1, description="Steps between resumable checkpoints (only the latest is kept).")
    resume_interrupted_jobs: bool = Field(
        default=True,
        description="After a restart, continue jobs that were running or waiting from their last checkpoint; "
        "false marks them failed.",
    )
    max_resumes_after_crash: int = Field(
        default=1, ge=0,
        description="How often a job that was running when the server died without a clean shutdown (the kernel's "
        "out-of-memory killer is the usual cause) is resumed at the next start; the next time it fails, so a job "
        "that kills the server cannot do it in a loop. 0: never resumed after a crash.",
    )
    failed_job_data_retention_hours: float = Field(
        default=168.0, ge=0,
        description="How long failed and cancelled jobs keep their data snapshot (for diagnosis) before it is "
        "removed; 0 removes it when the job ends. Completed jobs keep theirs until the job is deleted.",
    )
    model_roots: list[str] = Field(
        default_factory=lambda: [".", "~/.cache/huggingface"],
        description="Local model directories must resolve (after symlinks) inside one of these.",
    )
    dataset_roots: list[str] = Field(
        default_factory=lambda: ["."], description="Local dataset files must resolve (after symlinks) inside one of these."
    )
    trust_remote_code: bool = Field(default=False, description="Allow models that ship their own Python code.")
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="Where a job's processes run: local (worker processes on this machine) or ray (a Ray Train "
        "TorchTrainer on the Ray cluster at ray_address; needs the [ray] extra, and output_dir on storage every "
        "node of the cluster sees at the same path).",
    )
    ray_address: str = Field(
        default="auto",
        description="executor ray: the cluster to connect to at start-up, host:port of its head (GCS), or auto "
        "(a cluster started on this machine with `ray start`).",
    )
    processes_per_job: int = Field(
        default=1, ge=1, le=64,
        description="Processes per job, launched by torchrun: one per GPU on CUDA (the job gets that many GPUs), "
        "or that many processes over the gloo backend on a CPU.",
    )
    distributed_strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = Field(
        default="ddp",
        description="How a job's processes share the work when a request does not say: ddp (a model copy per "
        "device), fsdp or deepspeed_zero3 (sharded, CUDA only).",
    )
    max_concurrent_jobs: int | None = Field(
        default=None, ge=1,
        description="Most jobs training at once. Absent: 1 on a CPU; on CUDA, as many as the GPUs allow "
        "(each job holds processes_per_job GPUs).",
    )
    warm_worker: bool = Field(
        default=True,
        description="Keep one process with torch, transformers and TRL already imported that forks a fresh "
        "process for each one-process job, so the job starts at once rather than after seconds of imports, and "
        "still exits after it; the fork server costs about 1 GB of memory while idle.",
    )
    worker_silence_timeout_s: float = Field(
        default=600.0, gt=0,
        description="A training job whose worker reports no step for this long (a hung collective, a stuck rank) "
        "is killed and failed.",
    )
    report_to: list[Literal["tensorboard", "trackio"]] = Field(
        default_factory=list,
        description="Trackers that also receive every job's logged metrics: tensorboard (event files in "
        "<output_dir>/<job_uuid>/tensorboard) and/or trackio (a local database in <output_dir>/.trackio). A name, a "
        "list, or none; each must be installed, else the server does not start.",
    )
    limits: Limits = Field(default_factory=Limits)

    default_model: str | None = Field(default=None, description="Model for supervised-fine-tune requests that name none.")
    save_merged_model: bool = Field(
        default=False, description="LoRA jobs also save the adapter merged into the base model."
    )
    validation_fraction: float = Field(
        default=0.0, ge=0, lt=1,
        description="SFT: rows held out for validation when a request gives no validation_dataset_id.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """`none`, one name, a comma-separated string (from an env variable) or a list; a tracker that is not
        installed is refused here, at start-up, rather than dropped when the first job starts."""
        if value is None:
            return []
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value  # pydantic says what is wrong with it
        names = [n for n in names if n not in ("none", "")]
        for name in names:
            if name in ("tensorboard", "trackio") and importlib.util.find_spec(name) is None:
                raise ValueError(f"report_to: '{name}' is not installed in the server's Python environment "
                                 f"(pip install {name}), or leave it out of report_to")
        return names

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "~/.llama/distributions/trl", **kwargs: Any) -> dict[str, Any]:
        return {
            "device": "${env.TRL_DEVICE:=auto}",
            "output_dir": "${env.TRL_OUTPUT_DIR:=" + __distro_dir__ + "/post_training}",
            "kvstore": {"backend": "kv_default", "namespace": "post_training::trl"},
        }
