"""Direct Preference Optimization with TRL's DPOTrainer on one device.

Top to bottom: read the request, pick device and precision, load the model, build
the dataset from the job's snapshot, configure DPO, train (resuming if asked),
save the final model. The reference model is, in order of preference:
the base model with the LoRA adapter switched off (LoRA jobs: one copy of the
weights), log-probs precomputed once (precompute_ref_log_probs: no reference held
while training), or a frozen copy (TRL's default).
"""

from __future__ import annotations

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from ..api.models import Checkpoint, PreferenceOptimizeRequest
from ..data import read_jsonl
from . import common
from .context import JobContext
from .lora import peft_config_for, quantized_loading


def train(ctx: JobContext) -> list[Checkpoint]:
    request = PreferenceOptimizeRequest.model_validate(ctx.request)
    device, precision, warnings = common.resolve_device(ctx)
    ctx.report(persist=True, phase="loading", warnings=warnings,
               resources_allocated={"device": device, "precision": precision})

    model, tokenizer = common.load_model_and_tokenizer(
        request.finetuned_model, ctx, **quantized_loading(request.algorithm_config.lora, device, precision))
    if device == "cpu":  # before build_trainer: a precompute_ref_log_probs pass runs inside it
        threads = common.configure_cpu_threads(model, device)
        ctx.report(persist=True, resources_allocated={"device": device, "precision": precision, "cpu_threads": threads})
    ctx.raise_if_stopped()

    trainer = build_trainer(ctx, model, tokenizer, device, precision)
    common.report_length_losses(trainer, ctx)
    ctx.raise_if_stopped()

    common.run_training(trainer, ctx)
    return common.save_artifacts(trainer, ctx, lora=request.algorithm_config.lora is not None)


def build_trainer(ctx: JobContext, model, tokenizer, device: str, precision: str) -> DPOTrainer:
    algo = PreferenceOptimizeRequest.model_validate(ctx.request).algorithm_config
    dataset = Dataset.from_list(read_jsonl(ctx.data_dir / "train.jsonl"))
    validation = common.validation_dataset(ctx)
    precompute = algo.precompute_ref_log_probs
    if precompute is None:
        precompute = not ctx.config.use_reference_model
    # With LoRA, TRL leaves ref_model None and runs the reference pass with the adapter
    # disabled: the base weights are held once, and there is nothing to precompute.
    peft_config = peft_config_for(model, algo.lora) if algo.lora else None

    args = DPOConfig(
        **common.trainer_arguments(ctx, device, precision),
        beta=algo.beta if algo.beta is not None else ctx.config.dpo_beta,
        loss_type=[algo.loss_type.value],
        label_smoothing=algo.trl_label_smoothing(),
        max_length=ctx.plan.max_length,
        precompute_ref_log_probs=precompute and peft_config is None,
        trust_remote_code=ctx.config.trust_remote_code,
        activation_offloading=ctx.plan.activation_offloading,
        dataset_num_proc=None,
        **common.evaluation_arguments(ctx, validation),
    )
    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[common.JobCallback(ctx)],
    )
