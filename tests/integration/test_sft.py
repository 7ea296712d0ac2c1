"""Supervised fine-tuning over HTTP against a real server: instruct and dialog rows,
full and LoRA, packed, validation each epoch, merged adapters, and the 400s."""

import json
import math

from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from pictures import assert_shows_curves
from safetensors.torch import load_file
from stack_server import StackServer
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration

LORA = {"type": "LoRA", "rank": 4, "alpha": 8, "lora_attn_modules": ["q_proj", "v_proj"]}


def sft_request(job_uuid: str, dataset: str, model=None, algorithm=None, n_epochs=2, max_steps_per_epoch=2,
                lr=1e-3, **data_config) -> dict:
    return {
        "job_uuid": job_uuid,
        **({"model": str(model)} if model else {}),
        **({"algorithm_config": algorithm} if algorithm else {}),
        "training_config": {
            "n_epochs": n_epochs,
            "max_steps_per_epoch": max_steps_per_epoch,
            "max_validation_steps": 1,
            "data_config": {"dataset_id": dataset, "batch_size": 4, **data_config},
            "optimizer_config": {"lr": lr},
        },
    }


def instruct(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


def dialog(rows: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in rows]


def submit(server, body: dict, version: str = "v1") -> httpx.Response:
    return httpx.post(f"{server.url}/{version}/post-training/supervised-fine-tune", json=body, timeout=60)


def train(server, body: dict, version: str = "v1") -> dict:
    r = submit(server, body, version)
    assert r.status_code == 200, r.text
    assert r.json() == {"job_uuid": body["job_uuid"]}
    status = server.wait(body["job_uuid"])
    assert status["status"] == "completed", (status, server.log_tail())
    return status


def assert_validated(status: dict) -> None:
    """Validation loss and perplexity in the status and in every checkpoint's metrics."""
    metrics = status["progress"]["metrics"]
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    for checkpoint in status["checkpoints"]:
        m = checkpoint["training_metrics"]
        assert m["train_loss"] is not None and m["validation_loss"] is not None
        assert m["perplexity"] == pytest.approx(math.exp(m["validation_loss"]))


def test_instruct_full_fine_tune_validates_each_epoch(server, tiny_model, seed_rows):
    rows = instruct(seed_rows)
    server.register_rows("sft-inst-train", rows[:12])
    server.register_rows("sft-inst-valid", rows[12:])
    status = train(server, sft_request("sft-inst-full", "sft-inst-train", model=tiny_model,
                                       validation_dataset_id="sft-inst-valid"))

    assert status["progress"]["step"] == status["progress"]["total_steps"] == 4  # 2 epochs x 2 steps
    assert_validated(status)
    (checkpoint,) = status["checkpoints"]
    assert checkpoint["kind"] == "model" and checkpoint["epoch"] == 2
    trained = AutoModelForCausalLM.from_pretrained(checkpoint["path"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    assert_shows_curves(Path(status["progress"]["curves"]), validation=True)  # loss and token accuracy, both sets


def test_dialog_lora_adapter_loads_with_peft_and_generates(server, tiny_model, seed_rows):
    server.register_rows("sft-dialog", dialog(seed_rows))
    lora = {**LORA, "apply_lora_to_mlp": True}
    status = train(server, sft_request("sft-dialog-lora", "sft-dialog", model=tiny_model, algorithm=lora, lr=1e-2),
                   version="v1alpha")

    artifacts = httpx.get(f"{server.url}/v1alpha/post-training/job/artifacts",
                          params={"job_uuid": "sft-dialog-lora"}).json()
    (checkpoint,) = artifacts["checkpoints"]
    assert checkpoint["kind"] == "adapter"
    assert checkpoint["training_metrics"]["train_loss"] is not None
    config = json.loads((__import__("pathlib").Path(checkpoint["path"]) / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(f"{checkpoint['path']}/adapter_model.safetensors")
    assert all("lora_" in name for name in weights)  # an adapter, not the base weights
    assert any(name.endswith("lora_B.weight") and w.abs().sum() > 0 for name, w in weights.items()), "B never trained"

    tokenizer = AutoTokenizer.from_pretrained(checkpoint["path"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), checkpoint["path"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert {k: status["resources_allocated"][k] for k in ("device", "precision", "executor", "world_size")} == {
        "device": "cpu", "precision": "fp32", "executor": "local", "world_size": 1}


def test_packed_rows_train_on_whole_sequences(server, tiny_model, seed_rows, workspace):
    data = workspace / "sft_instruct.jsonl"  # a local file, the README's shorthand
    data.write_text("".join(json.dumps({"input": r["prompt"], "output": r["chosen"]}) + "\n" for r in seed_rows))
    status = train(server, sft_request("sft-packed", str(data), model=tiny_model, packed=True, train_on_input=True,
                                       max_steps_per_epoch=4))
    # 16 short rows pack into one sequence: one step per epoch, not the four the rows alone would give
    assert status["progress"]["step"] == status["progress"]["total_steps"] == 2
    assert status["checkpoints"][0]["training_metrics"]["train_loss"] is not None


def test_merged_model_and_held_out_validation(workspace, tiny_model, seed_rows):
    srv = StackServer(workspace / "server-merged", extra_roots=[workspace], provider={
        "save_merged_model": True, "validation_fraction": 0.25, "default_model": str(tiny_model)}).start()
    try:
        srv.register_rows("sft-inst", instruct(seed_rows))
        status = train(srv, sft_request("sft-merged", "sft-inst", algorithm=LORA, lr=1e-2))  # no model: the default
    finally:
        srv.stop()

    assert "validation: 4 of 16 training rows held out (the provider's validation_fraction, 0.25)" in status["warnings"]
    assert_validated(status)
    adapter, merged = status["checkpoints"]
    assert (adapter["kind"], merged["kind"]) == ("adapter", "merged_model")

    merged_model = AutoModelForCausalLM.from_pretrained(merged["path"])
    assert not any("lora" in name for name in merged_model.state_dict())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter["path"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = AutoTokenizer.from_pretrained(merged["path"])("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged_model, with_adapter, base))
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)


def test_a_bad_row_is_a_400_naming_the_row_and_the_formats(server, tiny_model, seed_rows):
    rows = instruct(seed_rows[:4])
    rows[2] = {"prompt": "What is the capital of France?", "answer_text": "Paris."}
    server.register_rows("sft-bad-row", rows)
    r = submit(server, sft_request("sft-bad-row", "sft-bad-row", model=tiny_model))
    assert r.status_code == 400, r.text
    detail = r.text
    assert "row 2" in detail and "answer_text" in detail
    assert "prompt/completion" in detail and "messages" in detail

    # a validation set must be in the training set's format
    server.register_rows("sft-ok-inst", instruct(seed_rows[:4]))
    server.register_rows("sft-ok-dialog", dialog(seed_rows[:4]))
    r = submit(server, sft_request("sft-mixed", "sft-ok-inst", model=tiny_model, validation_dataset_id="sft-ok-dialog"))
    assert r.status_code == 400, r.text
    assert "validation_dataset_id: row 0 is dialog data" in r.text
    assert httpx.get(f"{server.url}/v1/post-training/job/status", params={"job_uuid": "sft-mixed"}).status_code == 404


def test_unknown_lora_module_is_a_400_listing_the_model_modules(server, tiny_model, seed_rows):
    server.register_rows("sft-lora-bad", instruct(seed_rows[:4]))
    body = sft_request("sft-lora-bad", "sft-lora-bad", model=tiny_model,
                       algorithm={**LORA, "lora_attn_modules": ["q_proj", "wq"]})
    r = submit(server, body, version="v1alpha")
    assert r.status_code == 400, r.text
    assert "no module 'wq'" in r.text
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert name in r.text
