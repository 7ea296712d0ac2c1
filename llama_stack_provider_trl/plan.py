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
    batch_size: int  # the global batch: rows per optimizer step, over every process and accumulation step
    per_device_batch_size: int
    processes: int
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
    strategy: str = "ddp"
    fsdp_cpu_offload: bool = False
    n_rows: int = 0  # the training rows the plan counted
    seed: int = 42  # TrainingArguments' default
    warnings: list[str] = field(default_factory=list)


def split_batch(tc: TrainingConfig, processes: int) -> tuple[int, int, str | None]:
    """(per-device batch, global batch, warning): the request's batch_size is the global batch, shared out
    over the job's processes and accumulation steps; when it does not divide, the nearest that does."""
    batch, accumulation = tc.data_config.batch_size, tc.gradient_accumulation_steps
    parts = processes * accumulation
    per_device = max(1, round(batch / parts))
    actual = per_device * parts
    if actual == batch:
        return per_device, actual, None
    return per_device, actual, (
        f"training_config.data_config.batch_size {batch} is not a multiple of {processes} process(es) x "
        f"{accumulation} accumulation step(s): each optimizer step trains on {actual} rows ({per_device} per process "
        "and step)")


def steps_per_pass(n_rows: int, global_batch: int) -> int:
    """Optimizer steps one pass over n_rows takes (the last batch may be partial)."""
    return max(1, math.ceil(n_rows / global_batch))


def steps_per_epoch(n_rows: int, tc: TrainingConfig, global_batch: int | None = None) -> int:
    return max(1, min(tc.max_steps_per_epoch, steps_per_pass(n_rows, global_batch or tc.data_config.batch_size)))


def _short_epoch_warning(tc: TrainingConfig, n_rows: int, global_batch: int) -> str | None:
    """Llama Stack's max_steps_per_epoch defaults to 1, so a request that leaves it out trains one batch per
    epoch; users must hear of it rather than find an undertrained model."""
    full = steps_per_pass(n_rows, global_batch)
    cap = tc.max_steps_per_epoch
    if cap >= full:
        return None
    rows = min(n_rows, cap * global_batch)
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


def check_memory_limits(tc: TrainingConfig, config: TrlPostTrainingConfig, sequences_per_row: int) -> None:
    """Refuse (ValueError, a 400) requests whose device steps could hold more tokens than the provider allows.
    Activation memory grows with the tokens in one step; a request that passes here can still be too large
    for a device, but not by orders of magnitude. DPO holds 2 sequences per row (chosen and rejected)."""
    limits = config.limits
    batch = tc.data_config.batch_size
    per_device, _, _ = split_batch(tc, config.processes_per_job)
    if batch > limits.max_batch_size:
        raise ValueError(f"training_config.data_config.batch_size: {batch} is above the provider's "
                         f"limits.max_batch_size ({limits.max_batch_size}); use gradient_accumulation_steps for a "
                         "larger effective batch")
    length = tc.max_seq_length or config.max_seq_length
    tokens = per_device * length * sequences_per_row
    if tokens > limits.max_tokens_per_step:
        factor = f" x {sequences_per_row}" if sequences_per_row > 1 else ""
        why = " (chosen and rejected)" if sequences_per_row > 1 else ""
        raise ValueError(
            f"training_config: per-device batch x max_seq_length{factor}{why} = {per_device} x {length}{factor} = "
            f"{tokens} tokens per device step, above the provider's limits.max_tokens_per_step "
            f"({limits.max_tokens_per_step}); lower data_config.batch_size (and raise gradient_accumulation_steps) "
            "or max_seq_length"
        )


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
    processes = config.processes_per_job
    per_device, global_batch, batch_warning = split_batch(tc, processes)
    if batch_warning:
        warnings.append(batch_warning)
    per_epoch = steps_per_epoch(n_rows, tc, global_batch)
    max_steps = per_epoch * tc.n_epochs
    if max_steps > limits.max_total_steps:
        raise ValueError(
            f"training_config: n_epochs x steps per epoch = {tc.n_epochs} x {per_epoch} = {max_steps} steps, above the "
            f"provider's limits.max_total_steps ({limits.max_total_steps})"
        )

    short = _short_epoch_warning(tc, n_rows, global_batch)
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
    strategy = config.distributed_strategy
    cpu_offload = False
    if eff is not None:
        if eff.enable_activation_checkpointing is not None:
            checkpointing = eff.enable_activation_checkpointing
        offloading = bool(eff.enable_activation_offloading)
        if eff.distributed_strategy is not None:
            strategy = eff.distributed_strategy
        elif eff.fsdp_cpu_offload or eff.memory_efficient_fsdp_wrap:
            strategy = "fsdp"  # Llama Stack 0.6.1's FSDP fields ask for FSDP
        cpu_offload = bool(eff.fsdp_cpu_offload)
    check_strategy(strategy, config)

    return TrainingPlan(
        max_steps=max_steps,
        steps_per_epoch=per_epoch,
        n_epochs=tc.n_epochs,
        batch_size=global_batch,
        per_device_batch_size=per_device,
        processes=processes,
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
        strategy=strategy,
        fsdp_cpu_offload=cpu_offload,
        n_rows=n_rows,
        seed=42 if tc.seed is None else tc.seed,
        warnings=warnings,
    )


def check_strategy(strategy: str, config: TrlPostTrainingConfig) -> None:
    """A strategy the devices cannot run is a 400, never a silent fallback: accelerate enables FSDP only
    for GPU set-ups (on a CPU the Trainer would quietly run DDP), and DeepSpeed needs CUDA and its package."""
    field_name = "training_config.efficiency_config.distributed_strategy"
    if strategy == "ddp":
        return
    if training_device(config.device) == "cpu":
        raise ValueError(f"{field_name}: '{strategy}' needs CUDA devices, and this provider trains on the CPU "
                         "(on a CPU the Trainer would silently fall back to DDP); use ddp")
    if strategy == "deepspeed_zero3":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(f"{field_name}: 'deepspeed_zero3' needs the deepspeed package, which is not installed")
