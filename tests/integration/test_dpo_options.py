"""What the request and the provider config say is what TRL does."""

import json

import httpx
import pytest
import torch
from stack_server import REPO, StackServer, dpo_request

pytestmark = pytest.mark.integration


def run_job(server, job_uuid, model, data, algorithm=None, **training):
    request = dpo_request(job_uuid, str(model), str(data), **training)
    if algorithm is not None:
        request["algorithm_config"] = algorithm
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", json=request, timeout=30)
    assert r.status_code == 200, r.text
    status = server.wait(job_uuid)
    assert status["status"] == "completed", status
    return status


# At step 1 the policy equals the reference, so every log-ratio is 0 and the first loss is the loss
# function at 0: sigmoid -log(sigmoid(0)) = ln 2, hinge relu(1 - 0) = 1, ipo (0 - 1/(2 beta))^2.
@pytest.mark.parametrize("algorithm,first_loss", [
    ({"beta": 0.1, "loss_type": "sigmoid"}, 0.693147),
    ({"beta": 0.1, "loss_type": "hinge"}, 1.0),
    ({"beta": 0.1, "loss_type": "ipo"}, 25.0),
    ({"beta": 0.5, "loss_type": "ipo"}, 1.0),
])
def test_beta_and_loss_type_are_honoured(server, tiny_model, seed_file, algorithm, first_loss):
    job = f"loss-{algorithm['loss_type']}-{algorithm['beta']}"
    status = run_job(server, job, tiny_model, seed_file, algorithm, max_steps_per_epoch=1)
    assert status["progress"]["loss"] == pytest.approx(first_loss, rel=1e-3)


EXPLICIT = {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "London."}]}
IMPLICIT = {  # hh-rlhf "trl-style": whole conversations, the shared start is the prompt
    "chosen": [{"role": "user", "content": "What is ML?"}, {"role": "assistant", "content": "Learning from data."}],
    "rejected": [{"role": "user", "content": "What is ML?"}, {"role": "assistant", "content": "Math stuff."}]}


@pytest.mark.parametrize("row", [EXPLICIT, IMPLICIT], ids=["explicit-prompt", "implicit-prompt"])
def test_conversational_rows_from_a_local_jsonl_train(server, workspace, tiny_model, row):
    job = f"conversational-{'explicit' if 'prompt' in row else 'implicit'}"
    path = workspace / f"{job}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(8)))
    status = run_job(server, job, tiny_model, path, batch_size=2)
    assert status["progress"]["step"] == 4
    assert "rewards/margins" in status["progress"]["metrics"]
    snapshot = (server.output_dir / job / "data" / "train.jsonl").read_text().splitlines()
    assert json.loads(snapshot[0]) == row  # stored as given: the prompt is not merged into chosen/rejected


def test_precomputed_reference_and_cpu_dtype(server, tiny_model, seed_file):
    status = run_job(server, "precomputed", tiny_model, seed_file,
                     {"beta": 0.1, "precompute_ref_log_probs": True}, dtype="bf16")
    # bf16 where the CPU multiplies it fast (AMX), else fp32 with a warning
    fast_bf16 = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    assert status["resources_allocated"]["precision"] == ("bf16" if fast_bf16 else "fp32")
    assert any("dtype 'bf16'" in w for w in status["warnings"]) != fast_bf16
    assert status["progress"]["loss"] is not None


def test_providers_d_registration_still_works(workspace, tiny_model, seed_file):
    server = StackServer(workspace / "providers-d", extra_roots=[workspace],
                         run_overrides={"external_providers_dir": str(REPO / "providers.d")}).start()
    try:
        providers = httpx.get(f"{server.url}/v1/providers").json()["data"]
        assert any(p["provider_type"] == "inline::trl" for p in providers)
        run_job(server, "via-providers-d", tiny_model, seed_file, max_steps_per_epoch=1)
    finally:
        server.stop()


def test_use_reference_model_false_trains_without_a_reference(workspace, tiny_model, seed_file):
    server = StackServer(workspace / "no-ref", provider={"use_reference_model": False, "dpo_beta": 0.5},
                         extra_roots=[workspace]).start()
    try:
        status = run_job(server, "no-ref", tiny_model, seed_file, {"loss_type": "ipo"}, max_steps_per_epoch=1)
        assert status["progress"]["loss"] == pytest.approx(1.0, rel=1e-3)  # dpo_beta 0.5 applied
    finally:
        server.stop()


def test_dpo_evaluates_the_validation_set_each_epoch(server, tiny_model, seed_file):
    request = dpo_request("dpo-validation", str(tiny_model), str(seed_file), n_epochs=2, max_steps_per_epoch=2)
    request["training_config"]["data_config"] = {"dataset_id": request["training_config"].pop("dataset"),
                                                 "batch_size": request["training_config"].pop("batch_size"),
                                                 "validation_dataset_id": str(seed_file)}
    request["training_config"]["max_validation_steps"] = 2
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", json=request, timeout=30)
    assert r.status_code == 200, r.text
    status = server.wait("dpo-validation")
    assert status["status"] == "completed", status
    metrics = status["checkpoints"][0]["training_metrics"]
    assert metrics["validation_loss"] == pytest.approx(status["progress"]["metrics"]["eval_loss"])
    assert metrics["perplexity"] is None  # exp(DPO loss) means nothing
