"""The job table and the scheduler's own logic, with a stand-in executor (no processes, no TRL)."""

import asyncio
import threading
import time

import pytest
from llama_stack.core.storage.kvstore.kvstore import InmemoryKVStoreImpl
from llama_stack_api.common.errors import ConflictError

from llama_stack_provider_trl import scheduler as scheduler_module
from llama_stack_provider_trl.api.models import JobStatus
from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.executors.base import Outcome
from llama_stack_provider_trl.jobs import JobNotFoundError, JobRecord, JobTable, StoreUnavailable, TooManyJobs, now
from llama_stack_provider_trl.plan import TrainingPlan


def plan_for(record):
    return TrainingPlan(max_steps=10, steps_per_epoch=10, n_epochs=1, batch_size=1, per_device_batch_size=1,
                        processes=record.request.get("processes", 1), gradient_accumulation_steps=1,
                        learning_rate=1e-5, weight_decay=0.0, warmup_steps=0, max_length=64,
                        gradient_checkpointing=False, activation_offloading=False, optim=None, shuffle=True,
                        dtype=None, logging_steps=1, save_steps=5, max_validation_steps=1)


class FakeJob:
    """Plays a job's processes by its request's "behaviour": ok, fail, wait (until killed or stopped)."""

    def __init__(self, spec, started: list):
        self.spec = spec
        self.behaviour = spec.request.get("behaviour", "ok")
        self.stopped = threading.Event()
        self.killed = threading.Event()
        started.append((spec.job_uuid, list(spec.devices), time.monotonic()))

    def processes(self):
        return [{"rank": 0, "pid": 1, "host": "here"}]

    def stop(self):
        self.stopped.set()

    def kill(self):
        self.killed.set()

    def wait(self, report):
        report(True, {"phase": "training", "resources_allocated": {"processes": self.processes()}})
        if self.behaviour == "fail":
            return Outcome("failed", error="rank 0: model directory unreadable")
        if self.behaviour == "finishes_anyway":  # its processes end well just as the cancel arrives
            self.killed.wait(5)
            return Outcome("completed", checkpoints=[])
        if self.behaviour == "wait":
            for step in range(1, 1000):
                report(False, {"step": step})
                if self.killed.is_set():
                    return Outcome("killed")
                if self.stopped.is_set():
                    return Outcome("interrupted")
                time.sleep(0.01)
        time.sleep(0.05)
        report(False, {"step": 10})
        return Outcome("completed", checkpoints=[{
            "identifier": f"{self.spec.job_uuid}/final", "created_at": now().isoformat(), "epoch": 1,
            "post_training_job_id": self.spec.job_uuid, "path": f"{self.spec.job_dir}/final"}])


class FakeExecutor:
    name = "fake"

    def __init__(self, devices=("cpu",)):
        self._devices = list(devices)
        self.started: list = []
        self.jobs: dict = {}
        self.prepared = 0
        self.closed = False

    def devices(self):
        return self._devices

    def start(self, spec):
        job = self.jobs[spec.job_uuid] = FakeJob(spec, self.started)
        return job

    def prepare(self):
        self.prepared += 1

    def close(self):
        self.closed = True


@pytest.fixture
def kv():
    return InmemoryKVStoreImpl()


@pytest.fixture
def table(kv):
    t = JobTable(kv)
    yield t
    t.close()


@pytest.fixture
def make_scheduler(table, tmp_path):
    made = []

    def make(devices=("cpu",), plan=plan_for, **config):
        executor = FakeExecutor(devices)
        s = scheduler_module.Scheduler(table, TrlPostTrainingConfig(output_dir=str(tmp_path), **config), plan, executor)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(2)


def add(table, job_uuid, behaviour="ok", **request):
    asyncio.run(table.add(JobRecord(job_uuid=job_uuid, method="dpo", request={"behaviour": behaviour, **request})))


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
    assert [name for name, _, _ in sched.executor.started] == ["j3", "j1", "j2"]
    records = [table.snapshot(n) for n in ["j3", "j1", "j2"]]
    for earlier, later in zip(records, records[1:]):
        assert earlier.completed_at <= later.started_at
    assert records[0].checkpoints[0].identifier == "j3/final"
    assert records[0].resources_allocated == {"executor": "fake", "world_size": 1, "devices": ["cpu"],
                                              "processes": [{"rank": 0, "pid": 1, "host": "here"}]}
    assert records[0].attempts == 1 and records[0].progress.step == 10


def test_jobs_side_by_side_on_their_own_devices_in_submission_order(table, make_scheduler):
    sched = make_scheduler(devices=("0", "1", "2", "3", "4"), processes_per_job=2)
    for name in ("a", "b", "c"):
        add(table, name, "wait", processes=2)
        sched.submit(name)
    wait_for(table, "a", {JobStatus.in_progress})
    wait_for(table, "b", {JobStatus.in_progress})
    time.sleep(0.1)
    assert table.snapshot("c").status == JobStatus.scheduled  # one GPU left: c waits for two
    devices = {name: table.snapshot(name).resources_allocated["devices"] for name in ("a", "b")}
    assert devices == {"a": ["0", "1"], "b": ["2", "3"]}
    sched.cancel("b")
    running = wait_for(table, "c", {JobStatus.in_progress})
    assert sorted(running.resources_allocated["devices"]) == ["2", "3"] or "4" in running.resources_allocated["devices"]
    assert [name for name, _, _ in sched.executor.started] == ["a", "b", "c"]


def test_max_concurrent_jobs_bounds_cpu_jobs(table, make_scheduler):
    sched = make_scheduler(max_concurrent_jobs=2)
    for name in ("x", "y", "z"):
        add(table, name, "wait")
        sched.submit(name)
    wait_for(table, "x", {JobStatus.in_progress})
    wait_for(table, "y", {JobStatus.in_progress})
    time.sleep(0.1)
    assert table.snapshot("z").status == JobStatus.scheduled
    sched.cancel("x")
    wait_for(table, "z", {JobStatus.in_progress})


def test_a_failure_fails_that_job_only(table, make_scheduler):
    sched = make_scheduler()
    for name, behaviour in [("bad", "fail"), ("good", "ok")]:
        add(table, name, behaviour)
        sched.submit(name)
    assert wait_for(table, "bad", {JobStatus.failed}).error == "rank 0: model directory unreadable"
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
    assert sched.cancel("running") == JobStatus.in_progress  # its processes are killed
    assert wait_for(table, "running", {JobStatus.cancelled}).progress.phase == "cancelled"
    assert sched.executor.jobs["running"].killed.is_set()
    time.sleep(0.1)
    assert [name for name, _, _ in sched.executor.started] == ["running"]  # the waiting job never started


def test_pause_frees_the_device_and_resume_queues_the_job_again(table, make_scheduler):
    sched = make_scheduler()
    add(table, "long", "wait")
    add(table, "next", "wait")
    add(table, "queued")
    for name in ("long", "next", "queued"):
        sched.submit(name)
    wait_for(table, "long", {JobStatus.in_progress})
    assert sched.pause("queued") == "paused"  # a waiting job leaves the queue at once
    assert sched.pause("long") == "pausing"  # a running one is asked for a checkpoint
    assert sched.executor.jobs["long"].stopped.is_set()
    wait_for(table, "next", {JobStatus.in_progress})  # its slot went to the next job
    record = table.snapshot("long")
    assert (record.status, record.paused, record.progress.phase) == (JobStatus.scheduled, True, "paused")
    assert record.events[-1]["message"].startswith("Fine-tuning job paused at step")
    assert sched.resume("next") is False  # not paused
    assert sched.resume("long") is True
    assert sched.cancel("next") == JobStatus.in_progress
    wait_for(table, "long", {JobStatus.in_progress})
    assert [name for name, _, _ in sched.executor.started] == ["long", "next", "long"]  # "queued" stayed paused
    assert table.snapshot("queued").paused and sched.cancel("queued") == JobStatus.cancelled
    sched.cancel("long")
    wait_for(table, "long", {JobStatus.cancelled})


def test_shutdown_reschedules_the_running_job(table, make_scheduler):
    sched = make_scheduler(resume_interrupted_jobs=True)
    add(table, "long", "wait")
    add(table, "next")
    sched.submit("long")
    sched.submit("next")
    wait_for(table, "long", {JobStatus.in_progress})
    sched.shutdown(5)
    assert sched.executor.jobs["long"].stopped.is_set() and sched.executor.closed
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


def test_a_warm_worker_is_prepared_while_nothing_trains(table, make_scheduler):
    sched = make_scheduler()
    deadline = time.monotonic() + 5
    while sched.executor.prepared == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.executor.prepared >= 1


# ---- issue 8: the scheduler survives every job, writes are checked, cancel always means cancelled ----


class FlakyStore(InmemoryKVStoreImpl):
    """An in-memory store whose writes fail while `failing` is set (a locked or read-only database)."""

    def __init__(self):
        super().__init__()
        self.failing = False
        self.failures = 0

    async def set(self, key, value, expiration=None):
        if self.failing:
            self.failures += 1
            raise OSError("database is locked")
        await super().set(key, value, expiration)


def test_a_job_that_cannot_be_planned_fails_alone_and_the_thread_lives_on(table, make_scheduler):
    def plan_or_refuse(record):
        if record.job_uuid == "too-long":
            raise ValueError("training_config.max_seq_length: 2048 is above the provider's limit of 1024")
        return plan_for(record)

    sched = make_scheduler(plan=plan_or_refuse)
    for name in ("too-long", "after"):
        add(table, name)
        sched.submit(name)
    failed = wait_for(table, "too-long", {JobStatus.failed})
    assert failed.error.startswith("could not start: ValueError: training_config.max_seq_length")
    assert wait_for(table, "after", {JobStatus.completed}).error is None


def test_a_cancel_answered_200_always_ends_cancelled(table, make_scheduler):
    sched = make_scheduler()
    add(table, "racing", "finishes_anyway")
    sched.submit("racing")
    wait_for(table, "racing", {JobStatus.in_progress})
    assert sched.cancel("racing") == JobStatus.in_progress
    record = wait_for(table, "racing", {JobStatus.cancelled, JobStatus.completed})
    assert record.status == JobStatus.cancelled and record.checkpoints == []
    assert not (sched.config.resolved_output_dir() / "racing" / "result.json").exists()


def test_cancel_after_completion_is_too_late(table, make_scheduler):
    sched = make_scheduler()
    add(table, "quick")
    sched.submit("quick")
    wait_for(table, "quick", {JobStatus.completed})
    assert sched.cancel("quick") == JobStatus.completed  # the provider answers 409 "too late"


def test_a_refused_first_write_leaves_no_job(tmp_path):
    store = FlakyStore()
    table = JobTable(store, retry_delays=(0.01,))
    try:
        store.failing = True
        table.reserve("phantom")
        with pytest.raises(StoreUnavailable) as raised:
            asyncio.run(table.add(JobRecord(job_uuid="phantom", method="dpo", request={})))
        assert getattr(raised.value, "status_code", None) == 503
        assert "nothing was queued" in str(raised.value)
        table.release("phantom")
        with pytest.raises(JobNotFoundError):
            table.snapshot("phantom")
        assert table.all() == [] and asyncio.run(store.values_in_range("job:", "job:\xff")) == []
        store.failing = False
        table.reserve("phantom")  # the id is free again
        asyncio.run(table.add(JobRecord(job_uuid="phantom", method="dpo", request={})))
        assert table.snapshot("phantom").status == JobStatus.scheduled
    finally:
        table.close()


def test_later_writes_are_retried_and_a_lasting_failure_shows_in_status(tmp_path):
    store = FlakyStore()
    table = JobTable(store, retry_delays=(0.05, 0.05, 0.05))
    try:
        asyncio.run(table.add(JobRecord(job_uuid="j", method="dpo", request={})))
        store.failing = True
        future = table.update("j", status=JobStatus.in_progress)
        time.sleep(0.07)
        store.failing = False  # the database comes back before the retries run out
        future.result(2)
        assert "in_progress" in asyncio.run(store.get("job:j")) and not table.snapshot("j").warnings

        store.failing = True
        with pytest.raises(OSError):
            table.update("j", status=JobStatus.completed).result(2)
        warnings = table.snapshot("j").warnings
        assert any(w.startswith("job store: this job's latest state could not be saved") for w in warnings)
        assert table.snapshot("j").status == JobStatus.completed  # still served from memory
        store.failing = False
        table.update("j", error=None).result(2)
        assert not table.snapshot("j").warnings and "completed" in asyncio.run(store.get("job:j"))
    finally:
        table.close()


def test_queue_limit_and_delete(table, kv):
    table.reserve("a", max_active=2)
    asyncio.run(table.add(JobRecord(job_uuid="a", method="dpo", request={})))
    table.reserve("b", max_active=2)
    with pytest.raises(TooManyJobs) as raised:
        table.reserve("c", max_active=2)  # a is waiting, b is being validated
    assert raised.value.status_code == 429 and "limits.max_queued_jobs (2)" in str(raised.value)
    table.release("b")
    with pytest.raises(ConflictError):
        asyncio.run(table.delete("a"))  # still waiting
    table.update("a", status=JobStatus.failed).result(2)
    asyncio.run(table.delete("a"))
    with pytest.raises(JobNotFoundError):
        table.snapshot("a")
    assert asyncio.run(kv.get("job:a")) is None
    table.reserve("a", max_active=2)  # its id is free again


def test_failed_and_cancelled_jobs_lose_their_data_after_the_retention(table, make_scheduler):
    sched = make_scheduler(failed_job_data_retention_hours=0)
    out = sched.config.resolved_output_dir()
    for name, behaviour in (("failing", "fail"), ("waiting", "ok"), ("fine", "ok")):
        (out / name / "data").mkdir(parents=True)
        (out / name / "data" / "train.jsonl").write_text("{}\n")
    add(table, "failing", "fail")
    add(table, "waiting")
    sched.cancel("waiting")
    add(table, "fine")
    sched.submit("failing")
    sched.submit("fine")
    wait_for(table, "fine", {JobStatus.completed})
    assert not (out / "failing" / "data").exists() and not (out / "waiting" / "data").exists()
    assert (out / "fine" / "data" / "train.jsonl").exists()  # completed jobs keep theirs until deleted
