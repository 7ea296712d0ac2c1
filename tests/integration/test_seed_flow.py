"""The seed README's flow, over HTTP, against a real server: register, train, poll, load."""

from pathlib import Path

import httpx
import pytest
import torch
from pictures import assert_shows_curves
from stack_server import dpo_request
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration


def test_seed_payload_trains_to_a_loadable_checkpoint(server, tiny_model, seed_rows):
    server.register_rows("seed-prefs", seed_rows)
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize",
                   json=dpo_request("seed-001", str(tiny_model), "seed-prefs", learning_rate=1e-3))
    assert r.status_code == 200, r.text
    assert r.json() == {"job_uuid": "seed-001"}

    status = server.wait("seed-001")
    assert status["status"] == "completed", status
    assert status["started_at"] and status["completed_at"] and status["scheduled_at"]
    progress = status["progress"]
    assert progress["step"] == progress["total_steps"] == 4  # 16 rows / batch 4, one epoch
    assert progress["loss"] is not None
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in progress["metrics"]
    assert any("reward_scale" in w for w in status["warnings"])
    assert any("reward_clip" in w for w in status["warnings"])

    artifacts = httpx.get(f"{server.url}/v1/post-training/job/artifacts", params={"job_uuid": "seed-001"}).json()
    (checkpoint,) = artifacts["checkpoints"]
    assert checkpoint["post_training_job_id"] == "seed-001"
    assert checkpoint["epoch"] == 1 and checkpoint["created_at"]
    assert checkpoint["training_metrics"]["train_loss"] is not None

    trained = AutoModelForCausalLM.from_pretrained(checkpoint["path"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    diffs = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert any(diffs), "trained weights equal the base model's"
    files = {p.name for p in Path(checkpoint["path"]).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files

    from llama_stack_provider_trl import history

    steps = history.read(server.output_dir / "seed-001")
    assert steps and steps[-1]["step"] == 4 and steps[-1]["total_steps"] == 4
    assert all("loss" in row and "rewards/margins" in row for row in steps), steps

    # its curves, drawn by the worker beside its artifacts, and where status says
    assert progress["curves"] == str(server.output_dir / "seed-001" / "curves.png")
    assert_shows_curves(Path(progress["curves"]))
