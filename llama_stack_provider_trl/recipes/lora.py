"""LoRA through peft, shared by the DPO and SFT recipes."""

from __future__ import annotations

import shutil

import torch
from peft import LoraConfig

from ..api.models import Checkpoint, LoraFinetuningConfig, PostTrainingMetric
from ..lora_targets import lora_target_modules
from . import common
from .context import JobContext


def peft_config_for(model: torch.nn.Module, lora: LoraFinetuningConfig) -> LoraConfig:
    available = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=lora_target_modules(lora, available),
        use_dora=bool(lora.use_dora),
        bias="none",
        task_type="CAUSAL_LM",
    )


def save_merged(trainer, ctx: JobContext, metric: PostTrainingMetric | None) -> Checkpoint:
    """The adapter folded into a copy of the base weights: a plain transformers model."""
    ctx.report(persist=True, phase="saving")
    merged_dir = ctx.job_dir / "merged"
    scratch = ctx.job_dir / ".merged.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(scratch))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(scratch))
    shutil.rmtree(merged_dir, ignore_errors=True)
    scratch.rename(merged_dir)
    return common.checkpoint_record(ctx, merged_dir, "merged_model", trainer.state, metric)
