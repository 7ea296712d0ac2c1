"""Which tokens carry loss in SFT: the recipe's trainer, TRL's collator, the tiny model. No server."""

from pathlib import Path

import pytest
import torch

from llama_stack_provider_trl.api.models import SupervisedFineTuneRequest
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.data import sft_format, sft_rows, write_jsonl
from llama_stack_provider_trl.plan import make_plan
from llama_stack_provider_trl.recipes import common, sft
from llama_stack_provider_trl.recipes.context import JobContext

PROMPT, ANSWER = "What is the capital of France?", "The capital of France is Paris."
ROWS = {
    "instruct": [{"prompt": PROMPT, "completion": ANSWER}, {"prompt": "Say hello.", "completion": "Hello there."}],
    "dialog": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT},
                      {"role": "assistant", "content": ANSWER}]},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there."}]},
    ],
}


def sft_trainer(tmp_path: Path, model_dir: Path, rows: list[dict], **data_config):
    request = SupervisedFineTuneRequest.model_validate({
        "job_uuid": "mask", "model": str(model_dir),
        "training_config": {"data_config": {"dataset_id": "x", "batch_size": 2, **data_config}},
    })
    config = TrlPostTrainingConfig(device="cpu", output_dir=str(tmp_path))
    ctx = JobContext(job_uuid="mask", job_dir=tmp_path / "mask", request=request.model_dump(mode="json"),
                     config=config, plan=make_plan(request.training_config, len(rows), config),
                     report=lambda persist=False, **fields: None)
    write_jsonl(sft_rows(rows, sft_format(rows, "rows", None)), ctx.data_dir / "train.jsonl")
    model, tokenizer = common.load_model_and_tokenizer(str(model_dir), ctx)
    return sft.build_trainer(ctx, model, tokenizer, "cpu", "fp32"), tokenizer


def first_row(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels of the first row, as TRL's collator hands them to the model."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    if "attention_mask" in batch:
        keep = batch["attention_mask"][0].bool()
        ids, labels = ids[keep], labels[keep]
    return ids, labels


def test_instruct_rows_without_input_train_only_on_the_completion(tmp_path, tiny_model):
    trainer, tokenizer = sft_trainer(tmp_path, tiny_model, ROWS["instruct"], train_on_input=False)
    ids, labels = first_row(trainer)
    start = int((labels != -100).nonzero()[0])
    assert start > 0
    assert (labels[:start] == -100).all()  # every prompt token is masked
    assert torch.equal(labels[start:], ids[start:])  # every completion token (and the EOS) counts
    assert tokenizer.decode(ids[:start]) == PROMPT
    assert tokenizer.decode(ids[start:]) == ANSWER + tokenizer.eos_token


def test_instruct_rows_with_input_train_on_every_token(tmp_path, tiny_model):
    trainer, _ = sft_trainer(tmp_path, tiny_model, ROWS["instruct"], train_on_input=True)
    ids, labels = first_row(trainer)
    assert torch.equal(labels, ids)


def test_dialog_rows_without_input_train_only_on_assistant_turns(tmp_path, tiny_model):
    trainer, tokenizer = sft_trainer(tmp_path, tiny_model, ROWS["dialog"], train_on_input=False)
    ids, labels = first_row(trainer)
    trained = labels != -100
    assert trained.any() and not trained.all()
    assert torch.equal(labels[trained], ids[trained])
    # system and user turns, and the assistant header, carry no loss; the answer and its end-of-turn do
    assert tokenizer.decode(ids[trained]) == ANSWER + tokenizer.eos_token
    assert PROMPT in tokenizer.decode(ids[~trained]) and "Be brief." in tokenizer.decode(ids[~trained])


def test_dialog_rows_with_input_train_on_every_token(tmp_path, tiny_model):
    trainer, _ = sft_trainer(tmp_path, tiny_model, ROWS["dialog"], train_on_input=True)
    ids, labels = first_row(trainer)
    assert torch.equal(labels, ids)


@pytest.mark.parametrize("fmt", ["instruct", "dialog"])
def test_packing_keeps_the_mask(tmp_path, tiny_model, fmt):
    trainer, tokenizer = sft_trainer(tmp_path, tiny_model, ROWS[fmt], train_on_input=False, packed=True)
    assert len(trainer.train_dataset) == 1  # both rows in one sequence
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = labels != -100
    text = tokenizer.decode(ids[trained])
    assert ANSWER in text and "Hello there." in text
    assert PROMPT not in text and "Say hello." not in tokenizer.decode(ids[trained])
