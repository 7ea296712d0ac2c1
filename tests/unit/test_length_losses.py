"""Rows longer than max_seq_length: TRL cuts them, and drops those whose prompt alone fills it.
The job says how many in its warnings, and fails saying why when none are left (TRL itself
would fail with "num_samples=0"). The recipes' trainers on the tiny model; no server."""

from pathlib import Path

import pytest

from llama_stack_provider_trl.api.models import PreferenceOptimizeRequest, SupervisedFineTuneRequest
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.data import preference_format, preference_rows, sft_format, sft_rows, write_jsonl
from llama_stack_provider_trl.plan import make_plan
from llama_stack_provider_trl.recipes import common, dpo, sft
from llama_stack_provider_trl.recipes.context import JobContext

LONG = "the capital of France is Paris " * 30  # far past 24 tokens
SHORT = "Say hello."
MAX = 24


def build(tmp_path: Path, model_dir: Path, method: str, rows: list[dict]):
    tc = {"max_seq_length": MAX, "data_config": {"dataset_id": "x", "batch_size": 2}}
    if method == "dpo":
        request = PreferenceOptimizeRequest.model_validate(
            {"job_uuid": "long", "finetuned_model": str(model_dir), "algorithm_config": {}, "training_config": tc})
        snapshot = preference_rows(rows, preference_format(rows, "rows"))
    else:
        request = SupervisedFineTuneRequest.model_validate(
            {"job_uuid": "long", "model": str(model_dir), "training_config": tc})
        snapshot = sft_rows(rows, sft_format(rows, "rows", None))
    config = TrlPostTrainingConfig(device="cpu", output_dir=str(tmp_path))
    reported: list[str] = []
    ctx = JobContext(job_uuid="long", job_dir=tmp_path / "long", request=request.model_dump(mode="json"),
                     config=config, plan=make_plan(request.training_config, len(rows), config),
                     report=lambda persist=False, **fields: reported.extend(fields.get("warnings", [])))
    write_jsonl(snapshot, ctx.data_dir / "train.jsonl")
    model, tokenizer = common.load_model_and_tokenizer(str(model_dir), ctx)
    recipe = dpo if method == "dpo" else sft
    return recipe.build_trainer(ctx, model, tokenizer, "cpu", "fp32"), ctx, reported


def dpo_row(prompt, chosen="It is Paris.", rejected="It is Rome."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def sft_row(prompt, completion="Hello there."):
    return {"prompt": prompt, "completion": completion}


@pytest.mark.parametrize("method, row", [("dpo", dpo_row), ("sft", sft_row)])
def test_rows_whose_prompt_fills_max_length_are_counted_in_the_warnings(tmp_path, tiny_model, method, row):
    rows = [row(LONG), row(SHORT), row(SHORT), row(SHORT)]
    trainer, ctx, reported = build(tmp_path, tiny_model, method, rows)
    common.report_length_losses(trainer, ctx)
    assert len(trainer.train_dataset) == 3  # TRL dropped the long-prompt row
    assert f"1 of 4 training rows dropped: the prompt alone is at least max_seq_length ({MAX} tokens)" in reported[0]


def test_rows_cut_but_kept_are_counted(tmp_path, tiny_model):
    rows = [dpo_row(SHORT, chosen=LONG), dpo_row(SHORT), dpo_row(SHORT)]
    trainer, ctx, reported = build(tmp_path, tiny_model, "dpo", rows)
    common.report_length_losses(trainer, ctx)
    assert reported == [f"1 of 3 training rows cut to max_seq_length ({MAX} tokens)"]


def test_nothing_said_when_every_row_fits(tmp_path, tiny_model):
    trainer, ctx, reported = build(tmp_path, tiny_model, "dpo", [dpo_row(SHORT), dpo_row(SHORT)])
    common.report_length_losses(trainer, ctx)
    assert reported == []


@pytest.mark.parametrize("method, row", [("dpo", dpo_row), ("sft", sft_row)])
def test_a_job_with_no_row_left_fails_saying_why(tmp_path, tiny_model, method, row):
    trainer, ctx, _ = build(tmp_path, tiny_model, method, [row(LONG), row(LONG)])
    with pytest.raises(RuntimeError, match=r"no training row is left.*max_seq_length \(24 tokens\)"):
        common.report_length_losses(trainer, ctx)
