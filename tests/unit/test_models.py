"""Request models: the seed README's payload, Llama Stack 0.6.1's shape, and what is refused."""

import pytest
from pydantic import ValidationError

from llama_stack_provider_trl.api.models import (
    DPOLossType,
    PreferenceOptimizeRequest,
    SupervisedFineTuneRequest,
    TrainingConfig,
)
from llama_stack_provider_trl.api.routes import describe_validation_errors

SEED = {
    "job_uuid": "dpo-training-001",
    "finetuned_model": "/path/to/your/model",
    "algorithm_config": {"type": "dpo", "reward_scale": 1.0, "reward_clip": 5.0},
    "training_config": {"n_epochs": 1, "max_steps_per_epoch": 100, "batch_size": 4, "learning_rate": 1e-6,
                        "dataset": "your-dataset-id"},
}

CANONICAL = {
    "job_uuid": "j1",
    "finetuned_model": "m",
    "algorithm_config": {"beta": 0.2, "loss_type": "ipo"},
    "training_config": {
        "n_epochs": 2, "max_steps_per_epoch": 5, "gradient_accumulation_steps": 2, "max_validation_steps": 1,
        "data_config": {"dataset_id": "d", "batch_size": 8, "shuffle": False, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 2e-5, "weight_decay": 0.0, "num_warmup_steps": 3},
        "efficiency_config": {"enable_activation_checkpointing": True},
        "dtype": "bf16",
    },
    "hyperparam_search_config": {},
    "logger_config": {},
}


def errors_of(payload, model=PreferenceOptimizeRequest) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(payload)
    return describe_validation_errors(info.value.errors())


def test_seed_payload_maps_onto_canonical_fields():
    request = PreferenceOptimizeRequest.model_validate(SEED)
    tc = request.training_config
    assert tc.data_config.dataset_id == "your-dataset-id"
    assert tc.data_config.batch_size == 4
    assert tc.optimizer_config.lr == 1e-6
    assert tc.max_steps_per_epoch == 100
    assert request.algorithm_config.beta is None  # the provider's dpo_beta applies
    assert request.algorithm_config.loss_type == DPOLossType.sigmoid
    assert request.algorithm_config.ignored_fields() == [
        "algorithm_config.reward_scale ignored: TRL's DPO has no equivalent",
        "algorithm_config.reward_clip ignored: TRL's DPO has no equivalent",
    ]


def test_llama_stack_061_payload_is_accepted_as_is():
    request = PreferenceOptimizeRequest.model_validate(CANONICAL)
    assert request.algorithm_config.beta == 0.2
    assert request.algorithm_config.loss_type == DPOLossType.ipo
    assert request.training_config.optimizer_config.num_warmup_steps == 3
    assert request.algorithm_config.ignored_fields() == []


def test_legacy_and_canonical_agreeing_is_fine():
    tc = TrainingConfig.model_validate({"learning_rate": 1e-5, "optimizer_config": {"lr": 1e-5}, "dataset": "d"})
    assert tc.optimizer_config.lr == 1e-5


@pytest.mark.parametrize("legacy,section,value", [
    ("learning_rate", {"optimizer_config": {"lr": 2e-5}}, 1e-5),
    ("batch_size", {"data_config": {"dataset_id": "d", "batch_size": 8}}, 4),
    ("dataset", {"data_config": {"dataset_id": "a"}}, "b"),
])
def test_contradicting_legacy_field_is_an_error(legacy, section, value):
    tc = {"dataset": "d", **section, legacy: value} if legacy != "dataset" else {**section, legacy: value}
    message = errors_of({**SEED, "training_config": tc})
    assert f"training_config.{legacy}" in message and "contradicts" in message


def test_unknown_fields_are_refused_and_named():
    assert "training_config.lerning_rate: Extra inputs are not permitted" in errors_of(
        {**SEED, "training_config": {**SEED["training_config"], "lerning_rate": 1}})
    assert "surprise: Extra inputs are not permitted" in errors_of({**SEED, "surprise": 1})


def test_missing_dataset_names_both_spellings():
    message = errors_of({**SEED, "training_config": {"n_epochs": 1}})
    assert "data_config.dataset_id" in message and "training_config.dataset" in message


def test_kto_pair_explains_itself():
    message = errors_of({**SEED, "algorithm_config": {"loss_type": "kto_pair"}})
    assert "kto_pair" in message and "sigmoid" in message


@pytest.mark.parametrize("field,value,expected", [
    ("n_epochs", 0, "training_config.n_epochs: Input should be greater than or equal to 1"),
    ("batch_size", "four", "training_config.data_config.batch_size: Input should be a valid integer"),
    ("learning_rate", -1, "training_config.optimizer_config.lr: Input should be greater than 0"),
])
def test_bad_numbers_name_the_field(field, value, expected):
    assert expected in errors_of({**SEED, "training_config": {**SEED["training_config"], field: value}})


@pytest.mark.parametrize("job_uuid", ["../etc", "a/b", "", ".hidden", "x" * 129, "a b"])
def test_job_uuid_must_be_a_safe_name(job_uuid):
    assert "job_uuid" in errors_of({**SEED, "job_uuid": job_uuid})


def test_sft_request_accepts_lora_and_none():
    base = {"job_uuid": "s", "training_config": {"dataset": "d"}}
    assert SupervisedFineTuneRequest.model_validate(base).algorithm_config is None
    lora = SupervisedFineTuneRequest.model_validate({**base, "algorithm_config": {
        "type": "LoRA", "lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": True, "apply_lora_to_output": False,
        "rank": 4, "alpha": 8}})
    assert lora.algorithm_config.rank == 4
    assert "algorithm_config" in errors_of({**base, "algorithm_config": {"type": "Other"}}, SupervisedFineTuneRequest)
