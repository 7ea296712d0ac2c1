"""Rows longer than max_seq_length, end to end: the job says in its warnings how many rows TRL
dropped, and a job left with none fails saying why (TRL alone said "num_samples=0")."""

import json

import httpx
import pytest
from stack_server import dpo_request

pytestmark = pytest.mark.integration

LONG_PROMPT = "the capital of France is Paris " * 30  # hundreds of tokens for the tiny model's tokenizer
SHORT = {"prompt": "Say hello.", "chosen": "Hello there.", "rejected": "Go away."}


def submit(server, job_uuid, model, rows, workspace):
    path = workspace / f"{job_uuid}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", timeout=30,
                   json=dpo_request(job_uuid, str(model), str(path), max_seq_length=24, max_steps_per_epoch=1))
    assert r.status_code == 200, r.text
    return server.wait(job_uuid)


def test_some_rows_too_long_train_with_a_warning_and_all_too_long_fail_saying_why(server, tiny_model, workspace):
    long_row = {**SHORT, "prompt": LONG_PROMPT}
    status = submit(server, "long-some", tiny_model, [long_row, SHORT, SHORT, SHORT], workspace)
    assert status["status"] == "completed", status
    assert any(w.startswith("1 of 4 training rows dropped: the prompt alone is at least max_seq_length (24 tokens)")
               for w in status["warnings"]), status["warnings"]

    status = submit(server, "long-all", tiny_model, [long_row, long_row], workspace)
    assert status["status"] == "failed"
    assert "no training row is left" in status["error"] and "max_seq_length (24 tokens)" in status["error"]
    assert "num_samples" not in status["error"]
