"""OpenAI fine-tuning's own logic, without a server: row formats, which tokens a weight-0 message leaves out of
the loss (the SFT recipe's trainer on the tiny model), and how a job's record reads as OpenAI objects."""

import csv
import io
import json
from datetime import UTC, datetime

import pytest
import torch

from llama_stack_provider_trl.api.models import Checkpoint, JobStatus, SupervisedFineTuneRequest
from llama_stack_provider_trl.api.openai_models import CreateFineTuningJobRequest
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.data import DataError, write_jsonl
from llama_stack_provider_trl.jobs import JobRecord
from llama_stack_provider_trl.openai_data import Rows, dpo_training_rows, parse_jsonl, sft_training_rows
from llama_stack_provider_trl.openai_view import checkpoints, events, job_object, page, results_csv
from llama_stack_provider_trl.plan import make_plan

USER, SKIPPED, ANSWER = "What is the capital of France?", "Let me think.", "The capital of France is Paris."


def chat(*messages) -> dict:
    return {"messages": [{"role": role, "content": content, **extra} for role, content, *rest in messages
                         for extra in [rest[0] if rest else {}]]}


def test_chat_rows_stay_messages_unless_a_weight_zero_asks_for_a_prompt():
    plain = Rows("training_file", [chat(("user", USER), ("assistant", ANSWER))])
    assert sft_training_rows(plain, None)[0] == [{"messages": [{"role": "user", "content": USER},
                                                               {"role": "assistant", "content": ANSWER}]}]
    weighted = Rows("training_file", [chat(("developer", "Be brief."), ("user", USER),
                                           ("assistant", SKIPPED, {"weight": 0}), ("assistant", ANSWER)),
                                      chat(("user", "Hi"), ("assistant", "Hello", {"weight": 1}))])
    rows, _ = sft_training_rows(weighted, None)
    assert rows[0] == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": USER},
                                  {"role": "assistant", "content": SKIPPED}],
                       "completion": [{"role": "assistant", "content": ANSWER}]}
    assert rows[1] == {"prompt": [{"role": "user", "content": "Hi"}],
                       "completion": [{"role": "assistant", "content": "Hello"}]}  # every row in one format


@pytest.mark.parametrize("row, expected", [
    (chat(("user", USER), ("assistant", ANSWER), ("user", "More?"), ("assistant", SKIPPED, {"weight": 0})),
     "line 2: messages[3].weight: 0 after a trained assistant message"),
    (chat(("user", USER, {"weight": 0}), ("assistant", ANSWER)), "line 2: messages[0].weight: only assistant"),
    (chat(("user", USER), ("assistant", ANSWER, {"tool_calls": [{}]})), "line 2: messages[1].tool_calls"),
    (chat(("robot", USER), ("assistant", ANSWER)), "line 2: messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": None}]},
     "line 2: messages[1].content must be a string"),
    ({**chat(("user", USER), ("assistant", ANSWER)), "tools": [{}]}, "line 2: field 'tools'"),
])
def test_chat_row_problems_name_the_line_and_field(row, expected):
    content = (json.dumps(chat(("user", "Hi"), ("assistant", "Hello"))) + "\n" + json.dumps(row) + "\n").encode()
    with pytest.raises(DataError) as caught:
        sft_training_rows(parse_jsonl("training_file", content, 100), None)
    assert f"training_file: {expected}" in str(caught.value)


def test_trl_rows_in_a_jsonl_file_are_named_by_line_too():
    content = b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n'
    with pytest.raises(DataError) as caught:
        sft_training_rows(parse_jsonl("training_file", content, 100), None)
    assert str(caught.value).startswith("training_file: line 3 fits no format")


def test_preference_rows_become_trl_conversational():
    row = {"input": {"messages": [{"role": "user", "content": USER}]},
           "preferred_output": [{"role": "assistant", "content": ANSWER}],
           "non_preferred_output": [{"role": "assistant", "content": "No idea."}]}
    rows, validation = dpo_training_rows(Rows("training_file", [row]), Rows("validation_file", [row]))
    assert rows == validation == [{"prompt": [{"role": "user", "content": USER}],
                                   "chosen": [{"role": "assistant", "content": ANSWER}],
                                   "rejected": [{"role": "assistant", "content": "No idea."}]}]
    bad = {**row, "non_preferred_output": [{"role": "user", "content": "No idea."}]}
    with pytest.raises(DataError, match=r"validation_file: row 0: non_preferred_output\[0\].role must be assistant"):
        dpo_training_rows(Rows("training_file", [row]), Rows("validation_file", [bad]))


def test_weight_zero_messages_carry_no_loss(tmp_path, tiny_model):
    """The recipe's own trainer on the converted rows: the weight-0 answer is context, the other one is learnt."""
    from llama_stack_provider_trl.recipes import common, sft
    from llama_stack_provider_trl.recipes.context import JobContext

    rows, _ = sft_training_rows(Rows("training_file", [
        chat(("user", "Hello."), ("assistant", SKIPPED, {"weight": 0}), ("user", USER), ("assistant", ANSWER))]), None)
    request = SupervisedFineTuneRequest.model_validate({
        "job_uuid": "w0", "model": str(tiny_model), "training_config": {"data_config": {"dataset_id": "x"}}})
    config = TrlPostTrainingConfig(device="cpu", output_dir=str(tmp_path))
    ctx = JobContext(job_uuid="w0", job_dir=tmp_path / "w0", request=request.model_dump(mode="json"), config=config,
                     plan=make_plan(request.training_config, 1, config), report=lambda persist=False, **fields: None,
                     method="sft")
    write_jsonl(rows, ctx.data_dir / "train.jsonl")
    model, tokenizer = common.load_model_and_tokenizer(str(tiny_model), ctx)
    trainer = sft.build_trainer(ctx, model, tokenizer, "cpu", "fp32")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = labels != -100
    assert torch.equal(labels[trained], ids[trained])
    assert tokenizer.decode(ids[trained]) == ANSWER + tokenizer.eos_token
    assert SKIPPED in tokenizer.decode(ids[~trained])


def test_request_limits_and_refusals():
    base = {"model": "m", "training_file": "file-1"}
    CreateFineTuningJobRequest.model_validate({**base, "metadata": {f"k{i}": "v" for i in range(16)}})
    for extra, message in [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16 keys"),
        ({"metadata": {"k" * 65: "v"}}, "at most 64 characters"),
        ({"metadata": {"k": "v" * 513}}, "at most 512 characters"),
        ({"method": {"type": "reinforcement"}}, "method.type: 'reinforcement' is not supported"),
        ({"integrations": [{"type": "wandb"}]}, "not supported (wandb)"),
        ({"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 2}}, "give DPO's in method.dpo.hyperparameters"),
        ({"suffix": "a:b"}, "String should match pattern"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            CreateFineTuningJobRequest.model_validate({**base, **extra})


def record(**changes) -> JobRecord:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    fields = dict(
        job_uuid="ftjob-1", method="dpo", status=JobStatus.completed, scheduled_at=at,
        started_at=at.replace(second=5), completed_at=at.replace(second=30),
        request={"training_config": {"n_epochs": 1, "data_config": {"dataset_id": "d", "batch_size": 2},
                                     "optimizer_config": {"lr": 1e-6}}, "algorithm_config": {"beta": 0.1},
                 "finetuned_model": "/models/tiny"},
        checkpoints=[Checkpoint(identifier="ftjob-1/final", created_at=at.replace(second=29), epoch=1,
                                post_training_job_id="ftjob-1", path="/out/ftjob-1/final")],
        events=[{"created_at": at.timestamp(), "level": "info", "message": "Created fine-tuning job: ftjob-1"}],
    )
    fields.update(changes)
    return JobRecord(**fields)


HISTORY = [{"step": 1, "total_steps": 2, "time": 1767225610.0, "loss": 0.69, "rewards/margins": 0.0},
           {"step": 2, "total_steps": 2, "time": 1767225620.0, "loss": 0.5, "rewards/margins": 0.3,
            "eval_loss": 0.6}]


def test_a_post_training_job_reads_as_an_openai_job_its_events_and_checkpoints(tmp_path):
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    job = FineTuningJob.model_validate(job_object(record(), HISTORY).model_dump())
    assert (job.status, job.model, job.training_file, job.seed) == ("succeeded", "/models/tiny", "d", 42)
    assert job.fine_tuned_model == "ft:tiny:ftjob-1" and job.method.dpo.hyperparameters.beta == 0.1
    assert job_object(record(status=JobStatus.scheduled, paused=True), []).status == "paused"
    assert job_object(record(status=JobStatus.failed, error="boom"), []).error.message == "boom"

    found = events(record(), HISTORY)
    for event in found:
        FineTuningJobEvent.model_validate(event.model_dump())
    assert [e.message.split(":")[0] for e in found] == [
        "The job has successfully completed", "Checkpoint saved", "Step 2/2", "Step 1/2",
        "Fine-tuning job started", "Created fine-tuning job"]
    assert found[2].type == "metrics" and found[2].data == {"step": 2, "total_steps": 2, "train_loss": 0.5,
                                                            "valid_loss": 0.6, "train_reward_margin": 0.3}
    second = page(found, found[1].id, 2, "event")
    assert [e.id for e in second.data] == [found[2].id, found[3].id] and second.has_more

    [checkpoint] = checkpoints(record(), tmp_path, HISTORY)
    FineTuningJobCheckpoint.model_validate(checkpoint.model_dump())
    assert (checkpoint.step_number, checkpoint.metrics.train_loss, checkpoint.metrics.valid_loss) == (2, 0.5, 0.6)


def test_results_csv_has_a_row_per_logged_step():
    rows = list(csv.DictReader(io.StringIO(results_csv("dpo", HISTORY))))
    assert [(r["step"], r["train_loss"], r["valid_loss"], r["train_reward_margin"]) for r in rows] == [
        ("1", "0.69", "", "0.0"), ("2", "0.5", "0.6", "0.3")]


def test_a_paused_job_stays_paused_across_a_restart(tmp_path):
    """At start-up the provider resubmits unfinished jobs, but not a paused one: it waits for its resume."""
    from llama_stack_provider_trl.post_training import TrlPostTrainingImpl

    class Table:
        def __init__(self):
            self.updates = []

        def update(self, job_uuid, **changes):
            self.updates.append((job_uuid, changes))

    class Scheduler:
        def __init__(self):
            self.submitted = []

        def submit(self, job_uuid):
            self.submitted.append(job_uuid)

    for resume in (True, False):
        impl = TrlPostTrainingImpl(TrlPostTrainingConfig(device="cpu", output_dir=str(tmp_path),
                                                         resume_interrupted_jobs=resume))
        impl.table, impl.scheduler = Table(), Scheduler()
        impl._recover(record(status=JobStatus.scheduled, paused=True, completed_at=None))
        assert impl.table.updates == [] and impl.scheduler.submitted == []
        impl._recover(record(job_uuid="other", status=JobStatus.scheduled, completed_at=None))
        assert (impl.scheduler.submitted == ["other"]) == resume
