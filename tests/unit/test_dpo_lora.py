"""DPO with a LoRA adapter: the reference is the base model with the adapter off, and the
base weights are held once. The trainer is built by the recipe itself, in-process. Counts, not timings."""

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llama_stack_provider_trl.api.models import PreferenceOptimizeRequest
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.data import preference_format, preference_rows, write_jsonl
from llama_stack_provider_trl.plan import make_plan
from llama_stack_provider_trl.recipes import common, dpo
from llama_stack_provider_trl.recipes.context import JobContext

REPO = Path(__file__).resolve().parents[2]


def dpo_lora_trainer(tmp_path: Path, model_dir: Path, lora: dict):
    rows = json.loads((REPO / "test_dpo_data.json").read_text())["data"][:8]
    request = PreferenceOptimizeRequest.model_validate({
        "job_uuid": "dpo-lora", "finetuned_model": str(model_dir), "algorithm_config": {"lora": lora},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 2, "optimizer_config": {"lr": 1e-2},
                            "data_config": {"dataset_id": "x", "batch_size": 4}},
    })
    # the provider's default keeps a reference model; LoRA must make it unnecessary anyway
    config = TrlPostTrainingConfig(device="cpu", output_dir=str(tmp_path), use_reference_model=True)
    ctx = JobContext(job_uuid="dpo-lora", job_dir=tmp_path / "dpo-lora", request=request.model_dump(mode="json"),
                     config=config, plan=make_plan(request.training_config, len(rows), config),
                     report=lambda persist=False, **fields: None)
    write_jsonl(preference_rows(rows, preference_format(rows, "rows")), ctx.data_dir / "train.jsonl")
    model, tokenizer = common.load_model_and_tokenizer(str(model_dir), ctx)
    return dpo.build_trainer(ctx, model, tokenizer, "cpu", "fp32")


def base_tensors(model_dir: Path) -> dict[str, int]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


def test_lora_dpo_holds_one_copy_of_the_base_and_references_it_with_the_adapter_off(tmp_path, tiny_model):
    lora = {"rank": 4, "alpha": 8, "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True}
    trainer = dpo_lora_trainer(tmp_path, tiny_model, lora)

    assert trainer.ref_model is None
    assert isinstance(trainer.model, PeftModel)
    assert not trainer.args.precompute_ref_log_probs
    # every tensor of the base model, once, frozen; the only trainable tensors are LoRA's
    expected = base_tensors(tiny_model)
    params = dict(trainer.model.named_parameters())
    base = {n: p for n, p in params.items() if "lora_" not in n}
    assert len(base) == len(expected) == 21
    assert sorted(list(p.shape) for p in base.values()) == sorted(expected.values())
    assert not any(p.requires_grad for p in base.values())
    assert all("lora_" in n for n, p in params.items() if p.requires_grad)
    # and no other module on the trainer holds weights of its own
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    for value in vars(trainer).values():
        if isinstance(value, torch.nn.Module):
            assert {p.untyped_storage().data_ptr() for p in value.parameters()} <= storages

    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert logged[-1]["rewards/chosen"] != 0.0  # the policy moved away from its reference

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer.model.eval()
    with torch.no_grad():
        with trainer.model.disable_adapter():
            reference = trainer.model(input_ids=ids).logits
        policy = trainer.model(input_ids=ids).logits
        original = fresh(input_ids=ids).logits
    assert torch.allclose(reference, original, atol=1e-5)  # adapter off: exactly the untouched base
    assert not torch.allclose(policy, original, atol=1e-5)


def test_lora_dpo_trains_the_output_layer_without_an_adapter_on_it(tmp_path, tiny_model):
    """TRL refuses an adapter on lm_head; apply_lora_to_output trains it in full, beside the original."""
    lora = {"rank": 4, "alpha": 8, "lora_attn_modules": ["q_proj"], "apply_lora_to_output": True}
    trainer = dpo_lora_trainer(tmp_path, tiny_model, lora)
    assert trainer.ref_model is None
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n and "lm_head" in n for n in trainable)
    # one frozen original of each base tensor, plus one trainable copy of lm_head
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert len(frozen) == len(base_tensors(tiny_model))

    trainer.train()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer.model.eval()
    with torch.no_grad(), trainer.model.disable_adapter():
        assert torch.allclose(trainer.model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)
