"""The job table and the scheduler's own logic, with a stand-in recipe (no TRL)."""

import asyncio
import time

import pytest
from llama_stack.core.storage.kvstore.kvstore import InmemoryKVStoreImpl
from llama_stack_api.common.errors import ConflictError

import fake_recipe
from llama_stack_provider_trl import scheduler as scheduler_module
from llama_stack_provider_trl.api.models import JobStatus
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.jobs import JobNotFoundError, JobRecord, JobTable
from llama_stack_provider_trl.plan import TrainingPlan


def plan_for(record):
    return TrainingPlan(max_steps=10, steps_per_epoch=10, n_epochs=1, batch_size=1, gradient_accumulation_steps=1,
                        learning_rate=1e-5, weight_decay=0.0, warmup_steps=0, max_length=64,
                        gradient_checkpointing=False, activation_offloading=False, optim=None, shuffle=True,
                        dtype=None, logging_steps=1, save_steps=5, max_validation_steps=1)


@pytest.fixture
def kv():
    return InmemoryKVStoreImpl()


@pytest.fixture
def table(kv):
    t = JobTable(kv)
    yield t
    t.close()


@pytest.fixture
def make_scheduler(table, tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler_module, "RECIPES", {"dpo": "fake_recipe", "sft": "fake_recipe"})
    fake_recipe.RAN.clear()
    made = []

    def make(**config):
        s = scheduler_module.Scheduler(table, TrlPostTrainingConfig(output_dir=str(tmp_path), **config), plan_for)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(2)


def add(table, job_uuid, behaviour="ok"):
    table.add(JobRecord(job_uuid=job_uuid, method="dpo", request={"behaviour": behaviour})).result(2)


def wait_for(table, job_uuid, statuses, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = table.snapshot(job_uuid)
        if record.status in statuses:
            return record
        time.sleep(0.01)
    raise AssertionError(f"{job_uuid} stayed {table.snapshot(job_uuid).status}")


def test_records_survive_a_new_table_on_the_same_store(kv, table):
    add(table, "a")
    table.update("a", status=JobStatus.failed, error="boom").result(2)
    table.flush()
    (loaded,) = asyncio.run(JobTable(kv).load())
    assert (loaded.job_uuid, loaded.status, loaded.error, loaded.sequence) == ("a", JobStatus.failed, "boom", 1)


def test_duplicates_conflict_and_unknown_ids_are_404(table):
    add(table, "a")
    with pytest.raises(ConflictError):
        add(table, "a")
    with pytest.raises(ConflictError):
        table.reserve("a")
    table.reserve("b")
    with pytest.raises(ConflictError):
        table.reserve("b")  # still being validated by another request
    table.release("b")
    table.reserve("b")
    with pytest.raises(JobNotFoundError):
        table.snapshot("zzz")


def test_jobs_run_one_at_a_time_in_submission_order(table, make_scheduler):
    sched = make_scheduler()
    for name in ["j3", "j1", "j2"]:
        add(table, name)
        sched.submit(name)
    for name in ["j3", "j1", "j2"]:
        wait_for(table, name, {JobStatus.completed})
    assert fake_recipe.RAN == ["j3", "j1", "j2"]
    records = [table.snapshot(n) for n in ["j3", "j1", "j2"]]
    for earlier, later in zip(records, records[1:]):
        assert earlier.completed_at <= later.started_at
    assert records[0].checkpoints[0].identifier == "j3/final"


def test_a_failure_fails_that_job_only(table, make_scheduler):
    sched = make_scheduler()
    for name, behaviour in [("bad", "fail"), ("oom", "oom"), ("disk", "disk"), ("good", "ok")]:
        add(table, name, behaviour)
        sched.submit(name)
    assert "model directory unreadable" in wait_for(table, "bad", {JobStatus.failed}).error
    assert wait_for(table, "oom", {JobStatus.failed}).error.startswith("out of memory")
    assert wait_for(table, "disk", {JobStatus.failed}).error.startswith("disk full")
    good = wait_for(table, "good", {JobStatus.completed})
    assert good.error is None
    assert table.snapshot("bad").checkpoints == []


def test_cancel_a_waiting_job_and_a_running_one(table, make_scheduler):
    sched = make_scheduler()
    add(table, "running", "wait")
    add(table, "waiting")
    sched.submit("running")
    sched.submit("waiting")
    wait_for(table, "running", {JobStatus.in_progress})
    assert sched.cancel("waiting") == JobStatus.cancelled
    assert sched.cancel("running") == JobStatus.in_progress  # asked; it stops at its next step
    assert wait_for(table, "running", {JobStatus.cancelled}).progress.phase == "cancelled"
    time.sleep(0.1)
    assert fake_recipe.RAN == ["running"]  # the cancelled waiting job never started


def test_shutdown_reschedules_the_running_job(table, make_scheduler):
    sched = make_scheduler(resume_interrupted_jobs=True)
    add(table, "long", "wait")
    add(table, "next")
    sched.submit("long")
    sched.submit("next")
    wait_for(table, "long", {JobStatus.in_progress})
    sched.shutdown(5)
    assert table.snapshot("long").status == JobStatus.scheduled
    assert any("interrupted by server shutdown" in w for w in table.snapshot("long").warnings)
    assert table.snapshot("next").status == JobStatus.scheduled


def test_shutdown_without_resume_fails_interrupted_and_waiting_jobs(table, make_scheduler):
    sched = make_scheduler(resume_interrupted_jobs=False)
    add(table, "long", "wait")
    add(table, "next")
    sched.submit("long")
    sched.submit("next")
    wait_for(table, "long", {JobStatus.in_progress})
    sched.shutdown(5)
    for name in ("long", "next"):
        record = table.snapshot(name)
        assert (record.status, record.error) == (JobStatus.failed, "interrupted by server shutdown")
