"""Request and response models of the post_training API.

They follow Llama Stack 0.6.1's post_training models field for field, so clients
written against that API keep working. Three kinds of additions:

- legacy spellings from the 0.2.x README (``training_config.batch_size``,
  ``.learning_rate``, ``.dataset``; ``algorithm_config.type/reward_scale/reward_clip``)
  are accepted and mapped onto the canonical fields; a legacy field that
  contradicts its canonical twin is an error;
- optional extension fields (marked "extension") that TRL can honour;
- status details (progress, warnings, error) that the 0.6.1 models lacked.

Every model forbids unknown fields: a misspelt key is a 400, not a silent default.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JOB_UUID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# how a job is reached in a path: its id, or (another owner's job, with authentication) its owner-scoped key
JOB_KEY_PATTERN = JOB_UUID_PATTERN.removesuffix("$") + r"(@[0-9a-f]{16})?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerType(StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class DatasetFormat(StrEnum):
    instruct = "instruct"
    dialog = "dialog"


class JobStatus(StrEnum):
    completed = "completed"
    in_progress = "in_progress"
    failed = "failed"
    scheduled = "scheduled"
    cancelled = "cancelled"


class DPOLossType(StrEnum):
    """Loss functions TRL's DPOTrainer implements. ``kto_pair`` (Llama Stack 0.6.1) is gone from TRL."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sigmoid_norm = "sigmoid_norm"


# TRL refuses exo_pair without label smoothing (it takes its log); the EXO paper recommends 1e-3.
EXO_PAIR_LABEL_SMOOTHING = 1e-3
LABEL_SMOOTHING_LOSSES = (DPOLossType.exo_pair, DPOLossType.robust, DPOLossType.aot, DPOLossType.aot_unpaired)


class DataConfig(_Strict):
    dataset_id: str = Field(
        min_length=1,
        description="A dataset registered through /v1beta/datasets, or a local .json/.jsonl file inside the "
        "provider's dataset_roots.",
    )
    batch_size: int = Field(
        default=1, ge=1, le=4096,
        description="Rows per optimizer step (the global batch), shared out over the job's processes and "
        "gradient_accumulation_steps.")
    shuffle: bool = Field(default=True, description="Shuffle the training rows each epoch.")
    data_format: DatasetFormat | None = Field(
        default=None, description="SFT row format; detected from the rows when absent. Ignored by DPO."
    )
    validation_dataset_id: str | None = Field(default=None, description="Dataset evaluated once per epoch.")
    packed: bool | None = Field(default=False, description="SFT: pack several rows into one sequence.")
    train_on_input: bool | None = Field(
        default=False, description="SFT: also train on prompt tokens (false masks them from the loss)."
    )


class OptimizerConfig(_Strict):
    optimizer_type: OptimizerType = OptimizerType.adamw
    lr: float = Field(default=1e-6, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float | None = Field(
        default=None, ge=0, le=10.0, description="Weight decay; the provider's weight_decay when absent."
    )
    num_warmup_steps: int | None = Field(
        default=None, ge=0, description="Linear warm-up steps; the provider's warmup_ratio applies when absent."
    )


class EfficiencyConfig(_Strict):
    enable_activation_checkpointing: bool | None = Field(
        default=None, description="Gradient checkpointing; the provider's gradient_checkpointing when absent."
    )
    enable_activation_offloading: bool | None = Field(default=False, description="Offload activations to the CPU.")
    memory_efficient_fsdp_wrap: bool | None = Field(
        default=False, description="Shard the model with FSDP, wrapping each transformer layer (CUDA only).")
    fsdp_cpu_offload: bool | None = Field(
        default=False, description="Shard with FSDP (or DeepSpeed ZeRO-3) and keep parameters and optimizer state in "
        "CPU memory between uses (CUDA only).")
    distributed_strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] | None = Field(
        default=None, description="Extension: how the job's processes share the work. ddp: a full copy of the model "
        "on each device; fsdp and deepspeed_zero3 shard weights, gradients and optimizer state over the devices, for "
        "models that do not fit one (CUDA only). Absent: the provider's distributed_strategy, or fsdp when an FSDP "
        "field above is set.")


class TrainingConfig(_Strict):
    n_epochs: int = Field(default=1, ge=1, le=1000)
    max_steps_per_epoch: int = Field(default=1, ge=1, description="Optimizer steps per epoch, at most.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    max_validation_steps: int | None = Field(default=1, ge=1, description="Validation batches per evaluation.")
    data_config: DataConfig
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    efficiency_config: EfficiencyConfig | None = None
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        default=None,
        description="Mixed precision (autocast; weights stay fp32). bf16/fp16 only where the device runs them "
        "fast: on a CPU, bf16 needs AMX and fp16 is never used. Absent: bf16 on a GPU that supports it, and on an "
        "AMX CPU for models with hidden size >= 256; else fp32.",
    )
    max_seq_length: int | None = Field(
        default=None, ge=8, description="Extension: token limit per sequence; the provider's max_seq_length when absent."
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1,
        description="Extension: the trainer's random seed (data order, new weights); the same seed and request give "
        "the same weights. Absent: 42, the Trainer's default.")

    @model_validator(mode="before")
    @classmethod
    def _map_legacy_fields(cls, data: Any) -> Any:
        """Fold the 0.2.x README's flat keys into data_config / optimizer_config."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        legacy = {
            "dataset": ("data_config", "dataset_id"),
            "batch_size": ("data_config", "batch_size"),
            "learning_rate": ("optimizer_config", "lr"),
        }
        for key, (section, field) in legacy.items():
            if key not in data:
                continue
            value = data.pop(key)
            block = data.get(section)
            if block is None:
                block = {}
            if not isinstance(block, dict):
                continue  # let field validation report the wrong type
            block = dict(block)
            if field in block and block[field] != value:
                raise ValueError(
                    f"training_config.{key} ({value!r}) contradicts training_config.{section}.{field} "
                    f"({block[field]!r}); give one of them"
                )
            block[field] = value
            data[section] = block
        if "data_config" not in data:
            raise ValueError("training_config.data_config.dataset_id (or the legacy training_config.dataset) is required")
        return data


class LoraFinetuningConfig(_Strict):
    type: Literal["LoRA"] = "LoRA"
    lora_attn_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Attention projections to adapt (q_proj, k_proj, v_proj, output_proj/o_proj), mapped to the "
        "model's module names.",
    )
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = Field(
        default=False,
        description="Also train the output layer, in full: TRL computes log-probs from its weight directly, so it "
        "cannot carry an adapter. The trained layer is saved inside the adapter.",
    )
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: int = Field(default=16, ge=1)
    use_dora: bool | None = False
    quantize_base: bool | None = False


class QATFinetuningConfig(_Strict):
    type: Literal["QAT"] = "QAT"
    quantizer_name: str
    group_size: int


class DPOAlignmentConfig(_Strict):
    type: Literal["dpo"] = Field(default="dpo", description="Accepted for the 0.2.x README's payload.")
    beta: float | None = Field(
        default=None, gt=0, le=100, description="DPO temperature; the provider's dpo_beta when absent."
    )
    loss_type: DPOLossType = DPOLossType.sigmoid
    label_smoothing: float | None = Field(
        default=None, ge=0, lt=1,
        description="Extension, for the losses that use it (TRL's label_smoothing): robust, the probability that a "
        "preference label is flipped, in [0, 0.5), default 0; exo_pair, the EXO paper's epsilon, above 0, default "
        f"{EXO_PAIR_LABEL_SMOOTHING} (the paper's recommendation); aot and aot_unpaired, default 0. Any other "
        "loss_type: a 400.",
    )
    precompute_ref_log_probs: bool | None = Field(
        default=None,
        description="Extension: compute the reference log-probs once before training and keep no reference model. "
        "Absent: on when the provider's use_reference_model is false.",
    )
    lora: LoraFinetuningConfig | None = Field(
        default=None,
        description="Extension: train a LoRA adapter; the reference is the base model with the adapter off.",
    )
    # 0.1/0.2-era fields with no TRL equivalent: accepted, reported as ignored in the job's status.
    reward_scale: float | None = None
    reward_clip: float | None = None
    epsilon: float | None = None
    gamma: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _explain_kto_pair(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("loss_type") == "kto_pair":
            raise ValueError(
                "algorithm_config.loss_type 'kto_pair' was removed from TRL; use TRL's KTO trainer or one of: "
                + ", ".join(t.value for t in DPOLossType)
            )
        return data

    @model_validator(mode="after")
    def _check_label_smoothing(self) -> DPOAlignmentConfig:
        value, loss = self.label_smoothing, self.loss_type
        if value is None:
            return self
        if loss not in LABEL_SMOOTHING_LOSSES:
            raise ValueError(
                f"algorithm_config.label_smoothing is used only by the loss types "
                f"{', '.join(t.value for t in LABEL_SMOOTHING_LOSSES)}, not by '{loss.value}'"
            )
        if loss == DPOLossType.exo_pair and value == 0:
            # EXO takes log(epsilon)
            raise ValueError("algorithm_config.label_smoothing must be above 0 for loss_type 'exo_pair' "
                             f"(the EXO paper recommends {EXO_PAIR_LABEL_SMOOTHING})")
        if loss == DPOLossType.robust and value >= 0.5:
            raise ValueError("algorithm_config.label_smoothing must be below 0.5 for loss_type 'robust' "
                             "(it is the probability that a preference label is flipped)")
        return self

    def trl_label_smoothing(self) -> float:
        """What TRL gets: the request's value, else the default of its loss."""
        if self.label_smoothing is not None:
            return self.label_smoothing
        return EXO_PAIR_LABEL_SMOOTHING if self.loss_type == DPOLossType.exo_pair else 0.0

    def ignored_fields(self) -> list[str]:
        return [f"algorithm_config.{name} ignored: TRL's DPO has no equivalent"
                for name in ("reward_scale", "reward_clip", "epsilon", "gamma") if getattr(self, name) is not None]


class PreferenceOptimizeRequest(_Strict):
    job_uuid: str = Field(pattern=JOB_UUID_PATTERN, description="Letters, digits, '.', '_', '-'; at most 128.")
    finetuned_model: str = Field(min_length=1, description="A local Hugging Face model directory (or a hub id).")
    algorithm_config: DPOAlignmentConfig
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict, description="Not used.")
    logger_config: dict[str, Any] = Field(default_factory=dict, description="Not used.")


class SupervisedFineTuneRequest(_Strict):
    job_uuid: str = Field(pattern=JOB_UUID_PATTERN, description="Letters, digits, '.', '_', '-'; at most 128.")
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict, description="Not used.")
    logger_config: dict[str, Any] = Field(default_factory=dict, description="Not used.")
    model: str | None = Field(
        default=None, description="A local Hugging Face model directory; the provider's default_model when absent."
    )
    checkpoint_dir: str | None = Field(default=None, description="Not used: artifacts go under the provider's output_dir.")
    algorithm_config: LoraFinetuningConfig | QATFinetuningConfig | None = Field(
        default=None, discriminator="type", description="LoRA, or none for full fine-tuning."
    )


class CancelTrainingJobRequest(_Strict):
    job_uuid: str


class PostTrainingJob(BaseModel):
    job_uuid: str


class ListPostTrainingJobsResponse(BaseModel):
    data: list[PostTrainingJob]


class PostTrainingMetric(BaseModel):
    epoch: int
    train_loss: float | None = None
    validation_loss: float | None = None
    perplexity: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Extension: the trainer's last logged metrics.")


class Checkpoint(BaseModel):
    identifier: str
    created_at: datetime
    epoch: int
    post_training_job_id: str
    path: str
    training_metrics: PostTrainingMetric | None = None
    kind: Literal["model", "adapter", "merged_model"] = Field(default="model", description="Extension.")


class TrainingProgress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    loss: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Latest logged metrics (rewards/... for DPO).")
    tokens_per_second: float | None = None
    elapsed_seconds: float | None = None
    eta_seconds: float | None = None
    phase: str | None = Field(default=None, description="loading, training, saving.")
    curves: str | None = Field(default=None, description="Extension: path of the job's curves.png, redrawn while it trains.")


class PostTrainingJobStatusResponse(BaseModel):
    job_uuid: str
    status: JobStatus
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    resources_allocated: dict[str, Any] | None = None
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    progress: TrainingProgress | None = Field(default=None, description="Extension.")
    error: str | None = Field(default=None, description="Extension: why the job failed.")
    warnings: list[str] = Field(default_factory=list, description="Extension: fields accepted but not used, etc.")
    attempts: int = Field(default=0, description="Extension: how many times the job has started training; more "
                          "than one after a resume.")


class PostTrainingJobArtifactsResponse(BaseModel):
    job_uuid: str
    checkpoints: list[Checkpoint] = Field(default_factory=list)
