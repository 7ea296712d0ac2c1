import pytest

from llama_stack_provider_trl.api.models import TrainingConfig
from llama_stack_provider_trl.config import Limits, TrlPostTrainingConfig
from llama_stack_provider_trl.plan import make_plan


def tc(**kw):
    return TrainingConfig.model_validate({"dataset": "d", **kw})


def test_steps_are_epochs_times_capped_batches():
    config = TrlPostTrainingConfig()
    assert make_plan(tc(n_epochs=1, max_steps_per_epoch=100, batch_size=4), 16, config).max_steps == 4
    assert make_plan(tc(n_epochs=3, max_steps_per_epoch=2, batch_size=4), 16, config).max_steps == 6
    # batch_size is the global batch: 17 rows, 8 per optimizer step (2 per micro-batch x 4 accumulated) -> 3 steps
    plan = make_plan(tc(max_steps_per_epoch=100, batch_size=8, gradient_accumulation_steps=4), 17, config)
    assert (plan.max_steps, plan.per_device_batch_size, plan.batch_size, plan.warnings) == (3, 2, 8, [])


def test_the_global_batch_is_shared_out_over_processes_or_the_rounding_is_said():
    two = TrlPostTrainingConfig(processes_per_job=2)
    plan = make_plan(tc(max_steps_per_epoch=100, batch_size=8), 16, two)
    assert (plan.processes, plan.per_device_batch_size, plan.batch_size, plan.max_steps) == (2, 4, 8, 2)
    plan = make_plan(tc(max_steps_per_epoch=100, batch_size=5), 16, two)
    assert (plan.per_device_batch_size, plan.batch_size) == (2, 4)
    assert any("batch_size 5 is not a multiple of 2 process(es) x 1 accumulation step(s)" in w and "4 rows" in w
               for w in plan.warnings), plan.warnings


def test_provider_defaults_fill_what_the_request_leaves_out():
    config = TrlPostTrainingConfig(weight_decay=0.05, warmup_ratio=0.25, max_seq_length=512, gradient_checkpointing=True)
    plan = make_plan(tc(n_epochs=1, max_steps_per_epoch=8, batch_size=1), 100, config)
    assert (plan.weight_decay, plan.warmup_steps, plan.max_length, plan.gradient_checkpointing) == (0.05, 2, 512, True)
    plan = make_plan(tc(max_seq_length=64, optimizer_config={"weight_decay": 0.0, "num_warmup_steps": 1},
                        efficiency_config={"enable_activation_checkpointing": False}), 10, config)
    assert (plan.weight_decay, plan.warmup_steps, plan.max_length, plan.gradient_checkpointing) == (0.0, 1, 64, False)


def test_limits_are_enforced_with_the_field_named():
    config = TrlPostTrainingConfig(limits=Limits(max_total_steps=10, max_seq_length=128))
    with pytest.raises(ValueError, match="max_total_steps"):
        make_plan(tc(n_epochs=11, max_steps_per_epoch=1), 100, config)
    with pytest.raises(ValueError, match="training_config.max_seq_length"):
        make_plan(tc(max_seq_length=4096), 100, config)


def test_unused_settings_are_reported():
    plan = make_plan(tc(optimizer_config={"optimizer_type": "adam"}), 4, TrlPostTrainingConfig())
    assert any("adam" in w for w in plan.warnings)


@pytest.mark.parametrize("efficiency", [{"fsdp_cpu_offload": True}, {"memory_efficient_fsdp_wrap": True},
                                        {"distributed_strategy": "fsdp"}, {"distributed_strategy": "deepspeed_zero3"}])
def test_a_sharding_strategy_on_the_cpu_is_refused_not_downgraded(efficiency):
    with pytest.raises(ValueError, match="training_config.efficiency_config.distributed_strategy: .* needs CUDA"):
        make_plan(tc(efficiency_config=efficiency), 4, TrlPostTrainingConfig(device="cpu"))
    assert make_plan(tc(efficiency_config={"distributed_strategy": "ddp"}), 4,
                     TrlPostTrainingConfig(device="cpu")).strategy == "ddp"
    assert make_plan(tc(optimizer_config={"optimizer_type": "sgd"}), 4, TrlPostTrainingConfig()).optim == "sgd"


def test_an_epoch_cut_short_by_max_steps_per_epoch_says_so():
    config = TrlPostTrainingConfig(device="cpu")
    # Llama Stack's default max_steps_per_epoch is 1: 16 rows at batch 4 would train 4 of 16 rows an epoch
    plan = make_plan(tc(n_epochs=2, batch_size=4), 16, config)
    assert plan.max_steps == 2
    assert any("max_steps_per_epoch 1 (the default when a request gives none) stops each epoch after 1 of 4 steps "
               "(4 of 16 rows)" in w for w in plan.warnings), plan.warnings
    plan = make_plan(tc(max_steps_per_epoch=3, batch_size=4, gradient_accumulation_steps=2), 16, config)
    assert any("max_steps_per_epoch 3 stops each epoch after 3 of 4 steps (12 of 16 rows)" in w for w in plan.warnings)
    # a cap at or above a full pass is no news
    assert not any("max_steps_per_epoch" in w for w in make_plan(tc(max_steps_per_epoch=4, batch_size=4), 16,
                                                                 config).warnings)


def test_activation_offloading_on_the_cpu_is_refused_naming_the_field():
    request = tc(efficiency_config={"enable_activation_offloading": True})
    with pytest.raises(ValueError, match="training_config.efficiency_config.enable_activation_offloading"):
        make_plan(request, 4, TrlPostTrainingConfig(device="cpu"))
