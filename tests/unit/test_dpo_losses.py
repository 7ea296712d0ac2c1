"""Every loss_type the API lists trains a step with TRL on the tiny model, through the recipe's own trainer,
with only what a request can set (TRL refuses some losses without extra parameters: exo_pair needs label smoothing)."""

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from llama_stack_provider_trl.api.models import DPOAlignmentConfig, DPOLossType, PreferenceOptimizeRequest
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.data import preference_format, preference_rows, write_jsonl
from llama_stack_provider_trl.plan import make_plan
from llama_stack_provider_trl.recipes import common, dpo
from llama_stack_provider_trl.recipes.context import JobContext

REPO = Path(__file__).resolve().parents[2]


def one_step_trainer(tmp_path: Path, model_dir: Path, algorithm: dict, **config_fields):
    rows = json.loads((REPO / "test_dpo_data.json").read_text())["data"][:4]
    request = PreferenceOptimizeRequest.model_validate({
        "job_uuid": "loss", "finetuned_model": str(model_dir), "algorithm_config": algorithm,
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1, "optimizer_config": {"lr": 1e-3},
                            "data_config": {"dataset_id": "x", "batch_size": 4}},
    })
    config = TrlPostTrainingConfig(device="cpu", output_dir=str(tmp_path), use_reference_model=False, **config_fields)
    ctx = JobContext(job_uuid="loss", job_dir=tmp_path / "loss", request=request.model_dump(mode="json"),
                     config=config, plan=make_plan(request.training_config, len(rows), config),
                     report=lambda persist=False, **fields: None)
    write_jsonl(preference_rows(rows, preference_format(rows, "rows")), ctx.data_dir / "train.jsonl")
    model, tokenizer = common.load_model_and_tokenizer(str(model_dir), ctx)
    return dpo.build_trainer(ctx, model, tokenizer, "cpu", "fp32")


@pytest.mark.parametrize("loss_type", [t.value for t in DPOLossType])
def test_every_listed_loss_trains_a_step(tmp_path, tiny_model, loss_type):
    trainer = one_step_trainer(tmp_path, tiny_model, {"loss_type": loss_type})
    assert trainer.loss_types == [loss_type]
    trainer.train()
    assert trainer.state.global_step == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses), trainer.state.log_history


def test_label_smoothing_reaches_trl_with_each_loss_default(tmp_path, tiny_model):
    # exo_pair gets the EXO paper's epsilon when the request gives none, so it trains as written
    assert one_step_trainer(tmp_path, tiny_model, {"loss_type": "exo_pair"}).label_smoothing == 1e-3
    trainer = one_step_trainer(tmp_path, tiny_model, {"loss_type": "robust", "label_smoothing": 0.2})
    assert trainer.label_smoothing == 0.2


@pytest.mark.parametrize("algorithm,message", [
    ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "must be above 0 for loss_type 'exo_pair'"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "below 0.5 for loss_type 'robust'"),
    ({"loss_type": "sigmoid", "label_smoothing": 0.1}, "not by 'sigmoid'"),
    ({"loss_type": "aot", "label_smoothing": 1.0}, "label_smoothing"),
])
def test_label_smoothing_out_of_range_is_refused_naming_the_field(algorithm, message):
    with pytest.raises(ValidationError, match=message) as info:
        DPOAlignmentConfig.model_validate(algorithm)
    assert "label_smoothing" in str(info.value)
