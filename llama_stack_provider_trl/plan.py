"""Turn a request plus the provider config into concrete training settings.

Pure Python (no torch), so a request can be checked against the provider's
limits before it is accepted, and unit tests can pin down every mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .api.models import OptimizerType, TrainingConfig
from .config import TrlPostTrainingConfig
from .hardware import cuda, training_device


@dataclass
class TrainingPlan:
    max_steps: int
    steps_per_epoch: int
    n_epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_length: int
    gradient_checkpointing: bool
    activation_offloading: bool
    optim: str | None
    shuffle: bool
    dtype: str | None
    logging_steps: int
    save_steps: int
    max_validation_steps: int | None
    warnings: list[str] = field(default_factory=list)


def steps_per_pass(n_rows: int, tc: TrainingConfig) -> int:
    """Optimizer steps one pass over n_rows takes (the last batch and accumulation may be partial)."""
    batches = math.ceil(n_rows / tc.data_config.batch_size)
    return max(1, math.ceil(batches / tc.gradient_accumulation_steps))


def steps_per_epoch(n_rows: int, tc: TrainingConfig) -> int:
    return max(1, min(tc.max_steps_per_epoch, steps_per_pass(n_rows, tc)))


def _short_epoch_warning(tc: TrainingConfig, n_rows: int) -> str | None:
    """Llama Stack's max_steps_per_epoch defaults to 1, so a request that leaves it out trains one batch per
    epoch; users must hear of it rather than find an undertrained model."""
    full = steps_per_pass(n_rows, tc)
    cap = tc.max_steps_per_epoch
    if cap >= full:
        return None
    rows = min(n_rows, cap * tc.data_config.batch_size * tc.gradient_accumulation_steps)
    default = "" if "max_steps_per_epoch" in tc.model_fields_set else " (the default when a request gives none)"
    return (f"training_config.max_steps_per_epoch {cap}{default} stops each epoch after {cap} of {full} steps "
            f"({rows} of {n_rows} rows); set it to {full} or more to train on every row each epoch")


def _check_device_needs(tc: TrainingConfig, config: TrlPostTrainingConfig) -> None:
    """Settings that only work on a GPU are a 400 on a CPU provider, not a job that fails later."""
    eff = tc.efficiency_config
    if eff is not None and eff.enable_activation_offloading and training_device(config.device) != "cuda":
        why = "the provider's device is cpu" if config.device == "cpu" else f"no CUDA device: {cuda().reason}"
        raise ValueError("training_config.efficiency_config.enable_activation_offloading: moves activations from GPU "
                         f"memory to the CPU, so it needs a CUDA device, and this provider trains on the CPU ({why})")


def make_plan(tc: TrainingConfig, n_rows: int, config: TrlPostTrainingConfig) -> TrainingPlan:
    """Raises ValueError (a 400) for settings above the provider's limits."""
    warnings: list[str] = []
    _check_device_needs(tc, config)
    limits = config.limits
    max_length = tc.max_seq_length or config.max_seq_length
    if tc.max_seq_length is not None and max_length > limits.max_seq_length:
        raise ValueError(
            f"training_config.max_seq_length: {max_length} is above the provider's limit of {limits.max_seq_length}"
        )
    per_epoch = steps_per_epoch(n_rows, tc)
    max_steps = per_epoch * tc.n_epochs
    if max_steps > limits.max_total_steps:
        raise ValueError(
            f"training_config: n_epochs x steps per epoch = {tc.n_epochs} x {per_epoch} = {max_steps} steps, above the "
            f"provider's limits.max_total_steps ({limits.max_total_steps})"
        )

    short = _short_epoch_warning(tc, n_rows)
    if short:
        warnings.append(short)

    opt = tc.optimizer_config
    if opt.optimizer_type == OptimizerType.adam:
        warnings.append("optimizer_config.optimizer_type 'adam' runs as AdamW (weight decay decoupled)")
    optim = "sgd" if opt.optimizer_type == OptimizerType.sgd else None  # None: transformers' AdamW default
    warmup = opt.num_warmup_steps if opt.num_warmup_steps is not None else round(config.warmup_ratio * max_steps)

    eff = tc.efficiency_config
    checkpointing = config.gradient_checkpointing
    offloading = False
    if eff is not None:
        if eff.enable_activation_checkpointing is not None:
            checkpointing = eff.enable_activation_checkpointing
        offloading = bool(eff.enable_activation_offloading)
        for name in ("memory_efficient_fsdp_wrap", "fsdp_cpu_offload"):
            if getattr(eff, name):
                warnings.append(f"training_config.efficiency_config.{name} ignored: training runs on one device")

    return TrainingPlan(
        max_steps=max_steps,
        steps_per_epoch=per_epoch,
        n_epochs=tc.n_epochs,
        batch_size=tc.data_config.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay if opt.weight_decay is not None else config.weight_decay,
        warmup_steps=min(warmup, max_steps),
        max_length=max_length,
        gradient_checkpointing=checkpointing,
        activation_offloading=offloading,
        optim=optim,
        shuffle=tc.data_config.shuffle,
        dtype=tc.dtype,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        max_validation_steps=tc.max_validation_steps,
        warnings=warnings,
    )
