"""Request and response models of OpenAI's fine-tuning API (``/v1/fine_tuning/jobs``).

Field for field what the official ``openai`` SDK sends and parses (``openai.types.fine_tuning``), so
its ``client.fine_tuning.jobs`` methods work against this server. Requests forbid unknown fields, as
the post_training models do: a misspelt key is a 400 naming it. What cannot work here (reinforcement
fine-tuning, a Weights & Biases integration on an offline server) is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METADATA_MAX_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's limits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """OpenAI's hyperparameters; "auto" (or absent) is resolved when the job is created and shown resolved."""

    n_epochs: Literal["auto"] | int | None = Field(default=None, description="Passes over the training file.")
    batch_size: Literal["auto"] | int | None = Field(default=None, description="Rows per optimizer step.")
    learning_rate_multiplier: Literal["auto"] | float | None = Field(
        default=None, description="Times the method's base learning rate (README: OpenAI fine-tuning API).")

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= 1000:
            raise ValueError("must be 'auto' or an integer from 1 to 1000")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive_multiplier(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not value > 0:  # the learning rate it gives is checked too (at most 1)
            raise ValueError("must be 'auto' or a number above 0")
        return value


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | float | None = Field(
        default=None, description="DPO temperature; auto: the provider's dpo_beta.")

    @field_validator("beta")
    @classmethod
    def _positive_beta(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not 0 < value <= 100:
            raise ValueError("must be 'auto' or a number above 0, at most 100")
        return value


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> Method:
        if self.type == "reinforcement":
            raise ValueError("method.type: 'reinforcement' is not supported: reinforcement fine-tuning needs graders "
                             "this server does not run; use 'supervised' or 'dpo'")
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None or self.reinforcement is not None:
            raise ValueError(f"method: has settings for another method than type '{self.type}'")
        return self


class CreateFineTuningJobRequest(_Strict):
    model: str = Field(min_length=1, max_length=4096,
                       description="A local Hugging Face model directory inside model_roots, or a hub id.")
    training_file: str = Field(min_length=1, max_length=4096,
                               description="A Files API file id, a registered dataset id, or a local .json/.jsonl "
                               "path inside dataset_roots.")
    validation_file: str | None = Field(default=None, min_length=1, max_length=4096)
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method; applies to supervised jobs.")
    method: Method | None = Field(default=None, description="Absent: supervised.")
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                               description="Added to the fine-tuned model's name.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Absent: one is chosen and shown.")
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            kinds = ", ".join(sorted({str(i.get("type")) for i in value}))
            raise ValueError(f"not supported ({kinds}): this server reports to no outside service (it may have no "
                             "network); watch the job's events, checkpoints and results file instead")
        return value

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> CreateFineTuningJobRequest:
        if self.hyperparameters is None or self.method is None:
            return self
        if self.method.type == "dpo":
            raise ValueError("hyperparameters: the deprecated top-level hyperparameters apply to supervised jobs; "
                             "give DPO's in method.dpo.hyperparameters")
        if self.method.supervised is not None and self.method.supervised.hyperparameters is not None:
            raise ValueError("hyperparameters: given twice, top-level (deprecated) and in "
                             "method.supervised.hyperparameters; give one")
        return self


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} keys, got {len(value)}")
    for key, item in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise ValueError(f"key {key[:20]!r}...: keys are at most {METADATA_KEY_CHARS} characters")
        if len(item) > METADATA_VALUE_CHARS:
            raise ValueError(f"value of {key!r}: values are at most {METADATA_VALUE_CHARS} characters")
    return value


# ---- responses: what openai.types.fine_tuning parses ---------------------------------------------


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """openai.types.fine_tuning.FineTuningJob; status adds "paused" (OpenAI's pause answers it too)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
    path: str = Field(description="Extension: the checkpoint's directory, which from_pretrained loads.")
    kind: str = Field(default="model", description="Extension: model, adapter (LoRA) or merged_model.")


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


__all__ = [
    "CreateFineTuningJobRequest", "Hyperparameters", "DpoHyperparameters", "Method", "FineTuningJob",
    "FineTuningJobEvent", "FineTuningJobCheckpoint", "CheckpointMetrics", "JobError", "Page", "check_metadata",
]
