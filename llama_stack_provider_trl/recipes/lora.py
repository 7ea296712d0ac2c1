"""LoRA through peft, shared by the DPO and SFT recipes."""

from __future__ import annotations

import shutil
from typing import Any

import torch
from peft import LoraConfig

from ..api.models import Checkpoint, LoraFinetuningConfig, PostTrainingMetric
from ..lora_targets import OUTPUT_NAMES, lora_target_modules
from . import common
from .context import JobContext


def peft_config_for(model: torch.nn.Module, lora: LoraFinetuningConfig) -> LoraConfig:
    available = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targets = lora_target_modules(lora, available)
    # TRL computes log-probs from lm_head.weight directly and refuses an adapter there, so
    # apply_lora_to_output trains the output layer in full instead; peft keeps the original
    # beside the trained copy, so disabling the adapter still gives the base model.
    output = [t for t in targets if t in OUTPUT_NAMES]
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=[t for t in targets if t not in OUTPUT_NAMES],
        modules_to_save=output or None,
        use_dora=bool(lora.use_dora),
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantized_loading(lora: LoraFinetuningConfig | None, device: str, precision: str) -> dict[str, Any]:
    """from_pretrained arguments for QLoRA: the frozen base in 4-bit NF4, the adapter trained on top.
    The request was checked for bitsandbytes and a CUDA provider; this checks the device actually chosen."""
    if lora is None or not lora.quantize_base:
        return {}
    if device != "cuda":
        raise RuntimeError("algorithm_config.quantize_base: QLoRA needs a CUDA device; this job runs on the CPU")
    from transformers import BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return {
        "dtype": compute,
        "device_map": {"": torch.cuda.current_device()},
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        ),
    }


def save_merged(trainer, ctx: JobContext, metric: PostTrainingMetric | None, adapter: Checkpoint | None = None) -> Checkpoint:
    """The adapter folded into a copy of the base weights: a plain transformers model."""
    ctx.report(persist=True, phase="saving")
    merged_dir = ctx.job_dir / "merged"
    scratch = ctx.job_dir / ".merged.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "is_loaded_in_4bit", False) and adapter is not None:
        model = _unquantized_with_adapter(model, adapter, ctx)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(scratch))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(scratch))
    shutil.rmtree(merged_dir, ignore_errors=True)
    scratch.rename(merged_dir)
    return common.checkpoint_record(ctx, merged_dir, "merged_model", trainer.state, metric)


def _unquantized_with_adapter(model, adapter: Checkpoint, ctx: JobContext):
    """Merging into 4-bit weights would round the base model; merge into a copy in its stored dtype instead."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = model.peft_config["default"].base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype="auto", trust_remote_code=ctx.config.trust_remote_code)
    return PeftModel.from_pretrained(base, adapter.path)
