"""What every recipe does the same way: pick the device and precision, load the
model, report progress and stop for a shutdown through a TrainerCallback, and
save the final model as an artifact. Runs in a job's worker processes; imports
torch and transformers."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from ..api.models import Checkpoint, PostTrainingMetric
from .. import curves, history
from ..hardware import training_device
from ..jobs import now
from .context import JobContext

log = logging.getLogger(__name__)


def _freeze_long_lived_objects() -> None:
    """Once, when the worker imports the recipes: collect, then move every object alive now (torch,
    transformers, TRL: about half a million) out of the garbage collector's reach. Otherwise each full
    collection walks them all, a 0.2-0.3 s stall in training (measured in bench/RESULTS.md). Objects made
    later, the job's own, are collected as usual."""
    gc.collect()
    gc.freeze()


_freeze_long_lived_objects()

# torch's intra-op thread count as it was when the worker imported this module.
DEFAULT_CPU_THREADS = torch.get_num_threads()
# Models narrower than this train on one CPU thread: their ops are too small to split across cores, and the
# OpenMP barrier of every op costs more than it saves, and far more when other processes take a core.
# Measured on 2 cores (bench/RESULTS.md): the tiny preset (hidden 64) trains
# 5-8x faster with one thread; the 34m preset (hidden 512) gains a little from two.
SMALL_HIDDEN_SIZE = 256

# Metrics worth showing in status; TRL logs many more.
REPORTED_METRICS = (
    "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "mean_token_accuracy", "entropy", "eval_loss",
)


def resolve_device(ctx: JobContext) -> tuple[str, str, list[str]]:
    """(device, precision, warnings): bf16/fp16 only where the device runs them fast."""
    warnings: list[str] = []
    # the server's answer (hardware.py, no torch), so a job trains where its request was checked for
    device = training_device(ctx.config.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the NVIDIA driver reports a GPU, but torch cannot use it (torch.cuda.is_available() is "
                           "false); set the provider's device to cpu")
    dtype = ctx.plan.dtype
    if device == "cpu":
        return device, _cpu_precision(ctx, dtype, warnings), warnings
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype is None:
        return device, "bf16" if bf16_ok else "fp32", warnings
    if dtype == "bf16" and not bf16_ok:
        warnings.append("training_config.dtype 'bf16' is not supported by this GPU: trained in fp16")
        return device, "fp16", warnings
    return device, dtype, warnings


def cpu_has_fast_bf16() -> bool:
    """AMX tiles multiply bf16 several times faster than fp32 (measured 1633 vs 295 GFLOP/s on
    2 cores, bench/RESULTS.md); without them bf16 autocast only adds casts."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _cpu_precision(ctx: JobContext, dtype: str | None, warnings: list[str]) -> str:
    if dtype == "fp16":
        warnings.append("training_config.dtype 'fp16' is not used on the CPU, where it is slow: trained in fp32")
        return "fp32"
    if dtype == "bf16":
        if cpu_has_fast_bf16():
            return "bf16"
        warnings.append("training_config.dtype 'bf16' is not used on this CPU (no AMX), where it is slower: "
                        "trained in fp32")
        return "fp32"
    if dtype is None and cpu_has_fast_bf16() and (_hidden_size(ctx) or 0) >= SMALL_HIDDEN_SIZE:
        # bf16 autocast, fp32 master weights: the 34m model trained 1.23x faster; tiny models run slower in it
        return "bf16"
    return "fp32"


def _hidden_size(ctx: JobContext) -> int | None:
    model = ctx.request.get("finetuned_model") or ctx.request.get("model")
    config = Path(model).expanduser() / "config.json" if model else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("hidden_size")
    except (OSError, ValueError):
        return None


def configure_cpu_threads(model, device: str, world_size: int = 1) -> int:
    """Intra-op threads for this process: one for small models, else the cores shared out among the
    job's processes. Returns the count used."""
    if device != "cpu":
        return torch.get_num_threads()
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    threads = 1 if hidden is not None and hidden < SMALL_HIDDEN_SIZE else max(1, DEFAULT_CPU_THREADS // world_size)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def load_model_and_tokenizer(model_ref: str, ctx: JobContext, **model_kwargs: Any):
    """A local directory, or a hub id for users who have the hub; a clear error offline.
    model_kwargs go to from_pretrained (a quantization_config, say)."""
    local = Path(model_ref).expanduser()
    if local.is_dir():
        # absolute, because the model remembers the path it was loaded from (config._name_or_path) and a LoRA
        # adapter saves it as base_model_name_or_path: a relative one would load only from the server's directory
        local = local.resolve()
    kwargs: dict[str, Any] = {"trust_remote_code": ctx.config.trust_remote_code}
    if not local.is_dir():
        # hub downloads go under the provider's output_dir, like everything else it writes
        kwargs["cache_dir"] = str(ctx.config.resolved_output_dir() / "hub-cache")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else model_ref, **kwargs)
        # fp32 master weights: on the CPU that is the fast path; on GPUs autocast does bf16/fp16
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.is_dir() else model_ref, **{"dtype": torch.float32, **kwargs, **model_kwargs}
        )
    except OSError as exc:
        if local.is_dir():
            raise RuntimeError(f"could not load the model in {local}: {exc}") from None
        raise RuntimeError(
            f"'{model_ref}' is not a local model directory, and it could not be fetched from the Hugging Face hub "
            f"({'HF_HUB_OFFLINE is set' if os.environ.get('HF_HUB_OFFLINE') else 'no network access to the hub?'}): {exc}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def trainer_arguments(ctx: JobContext, device: str, precision: str) -> dict[str, Any]:
    """TrainingArguments shared by every recipe. Chosen for speed: no dataloader worker processes,
    no eval unless asked, no padding beyond the batch's longest row. With several processes the
    Trainer joins the process group torchrun set up (gloo on the CPU, NCCL on GPUs)."""
    plan = ctx.plan
    args: dict[str, Any] = dict(
        output_dir=str(ctx.checkpoints_dir),
        max_steps=plan.max_steps,
        per_device_train_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        warmup_steps=plan.warmup_steps,
        gradient_checkpointing=plan.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        logging_steps=plan.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the default hides a NaN loss as 0.0; the job must fail instead
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=1,
        **tracker_arguments(ctx),
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        train_sampling_strategy="random" if plan.shuffle else "sequential",
        seed=plan.seed,
    )
    if plan.optim:
        args["optim"] = plan.optim
    if ctx.world_size > 1:
        args["ddp_backend"] = "gloo" if device == "cpu" else "nccl"
    if plan.strategy == "fsdp":
        args["fsdp"] = "full_shard auto_wrap" + (" offload" if plan.fsdp_cpu_offload else "")
        args["fsdp_config"] = {"use_orig_params": True, "cpu_ram_efficient_loading": plan.fsdp_cpu_offload}
    elif plan.strategy == "deepspeed_zero3":
        args["deepspeed"] = deepspeed_zero3_config(plan)
    return args


TRACKIO_PROJECT = "llama-stack-trl"
TRACKIO_DIR = ".trackio"


def tracker_arguments(ctx: JobContext) -> dict[str, Any]:
    """The provider's report_to trackers, writing under output_dir like everything else a job writes. Both
    take their directory only from the environment (read when the Trainer is made, in this job's own process):
    TensorBoard event files go to <job_dir>/tensorboard (not under output_dir/checkpoints, the Trainer's
    default, which is removed when the job completes), trackio's database to <output_dir>/.trackio, one project
    with a run per job (a dot directory: no job id starts with a dot, and start-up leaves such directories alone
    rather than taking them for orphaned jobs)."""
    trackers = list(ctx.config.report_to)
    if not trackers:
        return {"report_to": "none"}
    if "tensorboard" in trackers:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.job_dir / "tensorboard")
    if "trackio" in trackers:
        os.environ["TRACKIO_DIR"] = str(ctx.config.resolved_output_dir() / TRACKIO_DIR)
    return {"report_to": trackers, "run_name": ctx.job_uuid, "project": TRACKIO_PROJECT}


def deepspeed_zero3_config(plan) -> dict[str, Any]:
    """ZeRO stage 3: parameters, gradients and optimizer state sharded over the job's GPUs; "auto"
    values are filled in by the Trainer from its own arguments."""
    offload = {"device": "cpu", "pin_memory": True} if plan.fsdp_cpu_offload else {"device": "none"}
    return {
        "zero_optimization": {"stage": 3, "offload_param": offload, "offload_optimizer": offload,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
    }


def validation_dataset(ctx: JobContext):
    """The job's validation rows (the request's validation set, or rows held out at submit time),
    at most max_validation_steps batches of them; None when the job has none."""
    from datasets import Dataset

    from ..data import read_jsonl

    path = ctx.data_dir / "validation.jsonl"
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if ctx.plan.max_validation_steps:
        rows = rows[: ctx.plan.max_validation_steps * ctx.plan.per_device_batch_size * ctx.world_size]
    return Dataset.from_list(rows)


def report_length_losses(trainer, ctx: JobContext) -> None:
    """TRL cuts rows to max_length and drops those left with nothing to learn from (a prompt that
    alone fills max_length); the job's warnings say how many, and a job with no rows left fails
    saying why, not with TRL's "num_samples=0"."""
    max_length = trainer.args.max_length
    if max_length is None or getattr(trainer.args, "packing", False):
        return  # packed rows are chunked, not cut or dropped
    limit = f"max_seq_length ({max_length} tokens)"
    warnings = []
    for name, dataset, n_in in (("training", trainer.train_dataset, ctx.plan.n_rows),
                                ("validation", trainer.eval_dataset, None)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise RuntimeError(
                f"no {name} row is left to train on: in every one the prompt alone is at least {limit}, and "
                "TRL drops such rows; raise training_config.max_seq_length or shorten the prompts")
        if n_in is not None and len(dataset) < n_in:
            warnings.append(f"{n_in - len(dataset)} of {n_in} {name} rows dropped: the prompt alone is at least "
                            f"{limit}, leaving no answer tokens to learn from")
        truncated = _count_truncated(dataset, max_length)
        if truncated:
            warnings.append(f"{truncated} of {len(dataset)} {name} rows cut to {limit}")
    if warnings:
        ctx.report(persist=True, warnings=warnings)


def _count_truncated(dataset, max_length: int) -> int:
    columns = dataset.column_names
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):  # DPO: the collator cuts prompt + answer
        lengths = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
        return sum(len(p) + max(len(c), len(r)) > max_length for p, c, r in lengths)
    if "input_ids" in columns:  # SFT: already cut while preparing; a row at the limit was (almost surely) cut
        return sum(len(ids) >= max_length for ids in dataset["input_ids"])
    return 0


def evaluation_arguments(ctx: JobContext, validation) -> dict[str, Any]:
    """Evaluate once per epoch. An epoch is max_steps_per_epoch steps, which can end before a pass
    over the data does, so epochs are counted in steps rather than with eval_strategy="epoch"."""
    if validation is None:
        return {"eval_strategy": "no"}
    return {
        "eval_strategy": "steps",
        "eval_steps": ctx.plan.steps_per_epoch,
        "per_device_eval_batch_size": ctx.plan.per_device_batch_size,
        "prediction_loss_only": True,  # else a second forward pass per batch computes logits nobody reads
    }


class JobCallback(TrainerCallback):
    """Progress out to the server (rank 0); a shutdown's stop request in, agreed by every rank."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.started = time.monotonic()
        self.start_step = 0
        self.metrics: dict[str, float] = {}
        # rank 0 keeps the history and draws it; the other ranks' logs are the same numbers
        self.curves = curves.Redrawer(ctx.job_dir, ctx.method, f"{ctx.method.upper()} {ctx.job_uuid}",
                                      lambda **fields: ctx.report(persist=True, **fields)) if ctx.is_main else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.start_step = state.global_step
        self.ctx.report(persist=True, phase="training", step=state.global_step, total_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.ctx.is_main:
            history.append(self.ctx.job_dir, state.global_step, logs, total_steps=state.max_steps,
                           epoch=round(request_epoch(state, self.ctx), 4))
            self.curves.maybe()
        self.metrics.update({k: float(v) for k, v in logs.items() if k in REPORTED_METRICS and _finite(v)})
        if "eval_loss" in logs and _finite(logs["eval_loss"]) and self.ctx.method == "sft":
            self.metrics["perplexity"] = perplexity(float(logs["eval_loss"]))
        elapsed = time.monotonic() - self.started
        fields: dict[str, Any] = {"metrics": dict(self.metrics), "elapsed_seconds": round(elapsed, 3)}
        if "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                if self.curves:
                    self.curves.now()  # the picture of the run up to where it diverged
                raise FloatingPointError(f"loss became {loss} at step {state.global_step}; lower the learning rate")
            fields["loss"] = loss
        if "num_tokens" in logs and elapsed > 0:
            fields["tokens_per_second"] = round(float(logs["num_tokens"]) / elapsed, 1)
        self.ctx.report(persist=True, **fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.curves:
            self.curves.now()  # the final picture, however the job's last redraw was timed

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.monotonic() - self.started
        done = state.global_step - self.start_step
        remaining = state.max_steps - state.global_step
        self.ctx.report(
            persist=False,
            step=state.global_step,
            epoch=round(request_epoch(state, self.ctx), 4),
            elapsed_seconds=round(elapsed, 3),
            eta_seconds=round(elapsed / done * remaining, 1) if done else None,
        )
        if state.global_step >= state.max_steps:
            control.should_save = False  # the final model is saved as the artifact instead
            control.should_log = True  # so short jobs report a loss too
        elif self._stop_agreed():
            control.should_training_stop = True
            control.should_save = True  # a resumable checkpoint at this step
        return control

    def _stop_agreed(self) -> bool:
        """Every rank must stop at the same step, or the others wait forever in the next collective:
        they agree on whether any of them has seen the stop request."""
        stop = self.ctx.stop_requested()
        if self.ctx.world_size == 1:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def device(self):
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def request_epoch(state, ctx: JobContext) -> float:
    """Epochs as the request counts them: max_steps_per_epoch steps each. TRL's state.epoch counts passes over
    the data instead, which differ whenever max_steps_per_epoch ends an epoch early (n_epochs 200 at one step of
    four each would show epoch 50). max_steps / n_epochs rather than plan.steps_per_epoch: packing (SFT) changes
    the steps per epoch after the plan was made, and max_steps with it."""
    per_epoch = (state.max_steps or ctx.plan.max_steps) / max(1, ctx.plan.n_epochs)
    return state.global_step / per_epoch if per_epoch else 0.0


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def run_training(trainer, ctx: JobContext) -> None:
    configure_cpu_threads(trainer.model, next(trainer.model.parameters()).device.type, ctx.world_size)
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    if trainer.state.global_step < trainer.state.max_steps:
        ctx.raise_if_stopped()  # stopped early for a shutdown; a finished run is saved regardless


def save_artifacts(trainer, ctx: JobContext, lora: bool) -> list[Checkpoint]:
    """The job's artifacts: the model (or LoRA adapter), plus the merged model where the provider asks for it."""
    checkpoint = save_final(trainer, ctx, kind="adapter" if lora else "model")
    checkpoints = [checkpoint]
    if lora and ctx.config.save_merged_model and ctx.is_main:
        from .lora import save_merged

        checkpoints.append(save_merged(trainer, ctx, checkpoint.training_metrics, adapter=checkpoint))
    trainer.accelerator.wait_for_everyone()
    if ctx.is_main:
        finish(ctx)
    return checkpoints


def save_final(trainer, ctx: JobContext, kind: str = "model", name: str = "final",
               metric: PostTrainingMetric | None = None) -> Checkpoint:
    """Write the artifact to a scratch dir and rename it into place, so a job that dies
    while saving leaves nothing that looks like a finished checkpoint. Every rank takes part
    in save_model (sharded strategies gather the weights); rank 0 writes the files."""
    ctx.report(persist=True, phase="saving")
    final = ctx.job_dir / name
    scratch = ctx.job_dir / f".{name}.partial"
    if ctx.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(scratch))
    if ctx.is_main:
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(scratch))
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    return checkpoint_record(ctx, final, kind, trainer.state, metric)


def checkpoint_record(ctx: JobContext, path: Path, kind: str, state, metric: PostTrainingMetric | None) -> Checkpoint:
    if metric is None:
        metric = final_metric(state, ctx)
    return Checkpoint(
        identifier=f"{ctx.job_uuid}/{path.name}",
        created_at=now(),
        epoch=metric.epoch,
        post_training_job_id=ctx.job_uuid,
        path=str(path),
        training_metrics=metric,
        kind=kind,  # type: ignore[arg-type]
    )


def final_metric(state, ctx: JobContext) -> PostTrainingMetric:
    """The last logged training metrics, and validation ones where the recipe evaluated."""
    train_logs = [h for h in state.log_history if "loss" in h]
    eval_logs = [h for h in state.log_history if "eval_loss" in h]
    last = dict(train_logs[-1]) if train_logs else {}
    metric = PostTrainingMetric(
        epoch=max(1, math.ceil(request_epoch(state, ctx) - 1e-9)) if state.global_step else ctx.plan.n_epochs,
        train_loss=last.get("loss"),
        metrics={k: float(v) for k, v in last.items() if k in REPORTED_METRICS and _finite(v)},
    )
    if eval_logs:
        metric.validation_loss = float(eval_logs[-1]["eval_loss"])
        if ctx.method == "sft":  # exp of a token cross-entropy; a DPO loss is not one
            metric.perplexity = perplexity(metric.validation_loss)
    return metric


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged run reports a large number, not inf


def finish(ctx: JobContext) -> None:
    """Intermediate checkpoints only serve resumption; a finished job does not need them."""
    shutil.rmtree(ctx.checkpoints_dir, ignore_errors=True)


__all__ = [
    "JobCallback", "configure_cpu_threads", "load_model_and_tokenizer", "resolve_device",
    "run_training", "save_final", "trainer_arguments", "finish", "final_metric", "checkpoint_record",
]
