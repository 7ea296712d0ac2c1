"""OpenAI's fine-tuning API, driven by the official `openai` SDK against the shared real server: files
uploaded to the stack's Files API, supervised and DPO jobs in OpenAI's row formats, events, checkpoints
that load, results files, pause and resume, cancel, the 400s, and the same jobs seen through post_training."""

import csv
import io
import json
import time

import httpx
import openai
import pytest
import torch
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration

FINAL = ("succeeded", "failed", "cancelled")


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def chat_rows(seed_rows: list[dict]) -> list[dict]:
    """OpenAI chat rows; every other one has an earlier assistant turn with weight 0 (no loss on it)."""
    rows = []
    for i, r in enumerate(seed_rows[:8]):
        messages = [{"role": "system", "content": "Answer briefly."}]
        if i % 2:
            messages += [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi!", "weight": 0}]
        messages += [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        rows.append({"messages": messages})
    return rows


def preference_rows(seed_rows: list[dict], n: int) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
             "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
             "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]} for r in seed_rows[:n]]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def upload(client, name: str, content: bytes) -> str:
    # Llama Stack 0.7.3's Files API refuses purpose "fine-tune"; the provider takes a file of any purpose
    return client.files.create(file=(name, content), purpose="assistants").id


def wait(client, job_id: str, statuses=FINAL, timeout: float = 180) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.1)


def parses(job) -> FineTuningJob:
    """Strictly, with the SDK's own type (the SDK itself builds responses leniently)."""
    return FineTuningJob.model_validate(job.model_dump())


def dpo_job(client, training_file: str, **overrides):
    body = dict(model="", training_file=training_file, seed=7,
                method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 2,
                                                                  "learning_rate_multiplier": 1000, "beta": 0.2}}})
    body.update(overrides)
    return client.fine_tuning.jobs.create(**body)


@pytest.fixture(scope="module")
def dpo_file(client, seed_rows) -> str:
    return upload(client, "prefs.jsonl", jsonl(preference_rows(seed_rows, 8)))


@pytest.fixture(scope="module")
def dpo_done(client, tiny_model, dpo_file) -> FineTuningJob:
    """One DPO job (8 rows, batch 2: 4 steps), shared by the tests that read a finished job."""
    job = dpo_job(client, dpo_file, model=str(tiny_model), suffix="prefs", metadata={"suite": "openai-dpo"})
    assert job.status in ("queued", "running")
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    return done


def test_supervised_job_from_openai_chat_rows(client, server, tiny_model, seed_rows):
    training_file = upload(client, "chat.jsonl", jsonl(chat_rows(seed_rows)))
    validation_file = upload(client, "valid.jsonl", jsonl(chat_rows(seed_rows[8:])[:2]))
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=training_file, validation_file=validation_file, suffix="chat", seed=3, metadata={"suite": "openai-sft"},
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 50})  # the legacy place
    parses(job)
    assert job.method.type == "supervised" and job.seed == 3
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    done = parses(wait(client, job.id))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{tiny_model.name}:chat:{job.id}"
    assert done.finished_at >= done.created_at and done.trained_tokens > 0

    # results file: one row per logged step, in the stack's Files API
    [results] = done.result_files
    rows = list(csv.DictReader(io.StringIO(client.files.content(results).text)))
    assert [r["step"] for r in rows][-1] == "2"
    assert rows[0]["train_loss"] and rows[0]["train_mean_token_accuracy"]
    assert rows[-1]["valid_loss"] and rows[-1]["valid_mean_token_accuracy"]  # validation_file, once per epoch
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.metrics.valid_loss == float(rows[-1]["valid_loss"])

    listed = client.fine_tuning.jobs.list(metadata={"suite": "openai-sft"})
    assert [j.id for j in listed.data] == [job.id]


def test_dpo_job_events_checkpoints_and_the_post_training_view(client, server, dpo_done, tiny_model):
    job = parses(dpo_done)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.fine_tuned_model == f"ft:{tiny_model.name}:prefs:{job.id}"

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    for event in events:
        FineTuningJobEvent.model_validate(event.model_dump())
    assert events[0].message == "The job has successfully completed"  # newest first
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    messages = [e.message for e in events]
    assert any(m.startswith("Created fine-tuning job") for m in messages)
    assert any(m.startswith("Files validated: 8 training rows") for m in messages)
    assert "Fine-tuning job started" in messages
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[0].data["step"] == 4 and metrics[0].data["total_steps"] == 4
    assert {"train_loss", "train_reward_margin", "train_reward_accuracy"} <= set(metrics[0].data)

    # paging: newest first, `after` an event id, no overlap, nothing left out
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first.has_more and [e.id for e in first.data] == [e.id for e in events[:2]]
    rest = client.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=100)
    assert not rest.has_more and [e.id for e in rest.data] == [e.id for e in events[2:]]

    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    FineTuningJobCheckpoint.model_validate(checkpoint.model_dump())
    assert checkpoint.step_number == 4 and checkpoint.metrics.train_loss is not None
    assert checkpoint.fine_tuned_model_checkpoint == job.fine_tuned_model
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path)  # the name resolves to a loadable directory
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))

    # results file with DPO's columns
    [results] = job.result_files
    rows = list(csv.DictReader(io.StringIO(client.files.content(results).text)))
    assert rows[-1]["step"] == "4" and rows[-1]["train_reward_margin"]

    # the same job through post_training
    status = server.status(job.id)
    assert status["status"] == "completed" and status["checkpoints"][0]["path"] == checkpoint.path
    listed = httpx.get(f"{server.url}/v1/post-training/jobs", timeout=30).json()["data"]
    assert {"job_uuid": job.id} in listed


def test_same_seed_and_request_give_the_same_weights(client, dpo_done, dpo_file, tiny_model):
    twin = dpo_job(client, dpo_file, model=str(tiny_model), suffix="prefs", metadata={"suite": "openai-dpo"})
    other = dpo_job(client, dpo_file, model=str(tiny_model), seed=8)  # another order of the rows
    weights = []
    for job in (dpo_done, twin, other):
        done = wait(client, job.id)
        assert done.status == "succeeded", done.error
        weights.append(load_file(f"{client.fine_tuning.jobs.checkpoints.list(job.id).data[0].path}/model.safetensors"))
    assert twin.seed == dpo_done.seed == 7 and other.seed == 8
    same, different = weights[0], weights[2]
    assert all(torch.equal(same[k], weights[1][k]) for k in same)
    assert any(not torch.equal(same[k], different[k]) for k in same)


def test_pause_then_resume_ends_at_the_same_step_count(client, server, tiny_model, seed_rows):
    training_file = upload(client, "prefs16.jsonl", jsonl(preference_rows(seed_rows, 16)))
    job = dpo_job(client, training_file, model=str(tiny_model),
                  method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 4, "batch_size": 1}}})
    total = 64  # 16 rows, batch 1, 4 epochs: what an uninterrupted job trains
    server.wait(job.id, statuses=("in_progress",), predicate=lambda s: (s["progress"] or {}).get("step", 0) >= 1)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait(client, job.id, statuses=("paused", *FINAL))
    assert paused.status == "paused"

    status = server.status(job.id)  # post_training shows a paused job as scheduled, phase paused
    assert status["status"] == "scheduled" and status["progress"]["phase"] == "paused"
    step = status["progress"]["step"]
    assert 0 < step < total
    [kept] = client.fine_tuning.jobs.checkpoints.list(job.id).data  # the resumable checkpoint
    assert kept.step_number == step and kept.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{step}")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert messages[:2] == [f"Fine-tuning job paused at step {step}", f"Checkpoint saved at step {step} (resumable)"]
    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running", "succeeded")
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)  # no longer paused

    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    status = server.status(job.id)
    assert status["progress"]["step"] == status["progress"]["total_steps"] == total
    assert status["attempts"] == 2 and f"resumed from the checkpoint at step {step}" in status["warnings"]
    [final] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert final.step_number == total
    assert "Fine-tuning job resumed" in [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]


def test_cancel_either_way(client, server, tiny_model, dpo_file, seed_file):
    job = dpo_job(client, dpo_file, model=str(tiny_model))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert wait(client, job.id).status == "cancelled"
    assert server.status(job.id)["status"] == "cancelled"

    # a post_training job, seen and cancelled through the OpenAI routes
    from stack_server import dpo_request

    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", timeout=60,
                   json=dpo_request("pt-seen-by-openai", str(tiny_model), str(seed_file)))
    assert r.status_code == 200, r.text
    seen = parses(client.fine_tuning.jobs.retrieve("pt-seen-by-openai"))
    assert seen.training_file == str(seed_file) and seen.method.type == "dpo"
    client.fine_tuning.jobs.cancel("pt-seen-by-openai")
    assert wait(client, "pt-seen-by-openai").status == "cancelled"
    assert "pt-seen-by-openai" in [j.id for j in client.fine_tuning.jobs.list(limit=1000).data]


@pytest.mark.parametrize("rows, method, expected", [
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 2}]}],
     "supervised", "training_file: line 2: messages[1].weight must be 0 or 1"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], "supervised",
     "training_file: line 1: messages has no assistant message with weight 1"),
    ([{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant",
      "content": "Hello"}], "non_preferred_output": [{"role": "assistant", "content": "Go away"}]}] * 2
     + [{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "non_preferred_output": []}],
     "dpo", "training_file: line 3: preferred_output must be a non-empty list of messages"),
    (["not json"], "dpo", "training_file: line 1: not valid JSON"),
])
def test_malformed_files_are_a_400_naming_the_line(client, server, tiny_model, rows, method, expected):
    content = b"\n".join(r.encode() if isinstance(r, str) else json.dumps(r).encode() for r in rows)
    training_file = upload(client, "bad.jsonl", content)
    before = len(client.fine_tuning.jobs.list(limit=1000).data)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file=training_file, method={"type": method})
    assert expected in caught.value.message, caught.value.message
    assert len(client.fine_tuning.jobs.list(limit=1000).data) == before  # nothing queued


@pytest.mark.parametrize("extra, field", [
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"model": "missing-model-dir/"}, "model"),
])
def test_refused_fields_are_a_400_naming_them(client, tiny_model, dpo_file, extra, field):
    body = {"model": str(tiny_model), "training_file": dpo_file, "method": {"type": "dpo"}, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**body)
    assert field in caught.value.message, caught.value.message


def test_routes_are_served_and_listed_in_pages(client, server):
    routes = httpx.get(f"{server.url}/v1/inspect/routes", timeout=30).json()["data"]
    served = {r["route"] for r in routes}
    base = "/v1/fine_tuning/jobs"
    assert {base, base + "/{fine_tuning_job_id}", *(f"{base}/{{fine_tuning_job_id}}/{p}" for p in (
        "cancel", "pause", "resume", "events", "checkpoints"))} <= served
    assert base in httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]

    everything = [j.id for j in client.fine_tuning.jobs.list(limit=1000).data]
    first = client.fine_tuning.jobs.list(limit=1)
    second = client.fine_tuning.jobs.list(after=first.data[0].id, limit=1)
    assert [first.data[0].id, second.data[0].id] == everything[:2] and first.has_more
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
