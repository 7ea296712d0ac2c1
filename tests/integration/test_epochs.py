"""Llama Stack's request defaults cut epochs short (max_steps_per_epoch 1): the job says so, and counts its
epochs as the request does, not as passes over the data."""

import httpx
import pytest
from stack_server import dpo_request

pytestmark = pytest.mark.integration


def test_a_short_epoch_is_reported_and_epochs_are_the_requests(server, tiny_model, seed_file):
    request = dpo_request("short-epochs", str(tiny_model), str(seed_file), n_epochs=3)
    del request["training_config"]["max_steps_per_epoch"]  # Llama Stack's default: 1
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", json=request, timeout=30)
    assert r.status_code == 200, r.text
    status = server.wait("short-epochs")
    assert status["status"] == "completed", status
    assert any("max_steps_per_epoch 1 (the default when a request gives none) stops each epoch after 1 of 4 steps "
               "(4 of 16 rows)" in w for w in status["warnings"]), status["warnings"]
    # 3 steps of 4 rows over 16 rows is 0.75 passes in TRL's count; the request asked for 3 epochs and got them
    assert (status["progress"]["step"], status["progress"]["epoch"]) == (3, pytest.approx(3.0))
    assert status["checkpoints"][0]["epoch"] == 3
