"""Supervised fine-tuning with TRL's SFTTrainer on one device.

Top to bottom: read the request, pick device and precision, load the model (its
frozen base in 4-bit for QLoRA), build the training and validation sets from the
job's snapshot, configure SFT, train (resuming if asked), save the adapter or the
model, and the adapter merged into the base where the provider asks for it.

Which tokens carry loss: with train_on_input false, the completion of
prompt/completion rows and the assistant turns of dialog rows (the chat template's
{% generation %} markers say which tokens those are); with true, every token.
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ..api.models import Checkpoint, SupervisedFineTuneRequest
from ..data import read_jsonl
from ..plan import make_plan
from . import common
from .context import JobContext
from .lora import peft_config_for, quantized_loading


def train(ctx: JobContext) -> list[Checkpoint]:
    request = SupervisedFineTuneRequest.model_validate(ctx.request)
    lora = request.algorithm_config  # LoRA or None: QAT is refused when the request arrives
    device, precision, warnings = common.resolve_device(ctx)
    ctx.report(persist=True, phase="loading", warnings=warnings,
               resources_allocated={"device": device, "precision": precision})

    model, tokenizer = common.load_model_and_tokenizer(request.model, ctx, **quantized_loading(lora, device, precision))
    ctx.raise_if_stopped()

    trainer = build_trainer(ctx, model, tokenizer, device, precision)
    common.report_length_losses(trainer, ctx)
    ctx.raise_if_stopped()

    common.run_training(trainer, ctx)
    return common.save_artifacts(trainer, ctx, lora=lora is not None)


def build_trainer(ctx: JobContext, model, tokenizer, device: str, precision: str) -> SFTTrainer:
    request = SupervisedFineTuneRequest.model_validate(ctx.request)
    data_config = request.training_config.data_config
    plan = ctx.plan

    # data.sft_rows wrote TRL's formats: {"prompt", "completion"} or {"messages"}
    train_rows = read_jsonl(ctx.data_dir / "train.jsonl")
    dialog = "messages" in train_rows[0]
    # conversational prompt/completion rows: OpenAI chat rows whose first assistant messages have weight 0
    # (openai_data.py); their loss is on the completion's assistant turns, both masks together
    conversational = dialog or isinstance(train_rows[0].get("prompt"), list)
    mask_input = not data_config.train_on_input
    if conversational:
        _check_chat_template(tokenizer, assistant_only=mask_input)

    validation = common.validation_dataset(ctx)

    args = SFTConfig(
        **common.trainer_arguments(ctx, device, precision),
        max_length=plan.max_length,
        packing=bool(data_config.packed),
        completion_only_loss=mask_input and not dialog,
        assistant_only_loss=mask_input and conversational,
        **common.evaluation_arguments(ctx, validation),
        trust_remote_code=ctx.config.trust_remote_code,
        activation_offloading=plan.activation_offloading,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=peft_config_for(model, request.algorithm_config) if request.algorithm_config else None,
        callbacks=[common.JobCallback(ctx)],
    )
    if args.packing:
        # The plan counted rows; packed, they are fewer sequences, and an epoch is one pass over
        # those. The trainer reads these when train() starts, so a resumed job gets the same numbers.
        packed = make_plan(request.training_config, len(trainer.train_dataset), ctx.config)
        args.max_steps, args.warmup_steps, args.eval_steps = packed.max_steps, packed.warmup_steps, packed.steps_per_epoch
    return trainer


def _check_chat_template(tokenizer, assistant_only: bool) -> None:
    """A failure TRL would report in its own terms, explained in the request's."""
    if not tokenizer.chat_template:
        raise RuntimeError("dialog rows (messages) need a chat template, and this model's tokenizer has none; "
                           "give instruct rows (prompt/completion) instead")
    if not assistant_only:
        return
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return
    try:
        get_training_chat_template(tokenizer)  # TRL ships marked versions of common templates
    except ValueError:
        raise RuntimeError(
            "training_config.data_config.train_on_input false limits the loss to assistant turns, which needs "
            "{% generation %} markers in the chat template; this model's template has none and TRL has no marked "
            "version of it. Set train_on_input: true to train on whole dialogs."
        ) from None
