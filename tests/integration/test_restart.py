"""Jobs survive the server: SIGKILL and SIGTERM mid-training, then a restart on the same storage."""

import signal
import time

import httpx
import pytest
from stack_server import StackServer, dpo_request

pytestmark = pytest.mark.integration

# 16 rows at batch 1: 16 steps an epoch; long enough on the tiny model to be stopped mid-way
LONG = {"batch_size": 1, "max_steps_per_epoch": 16, "n_epochs": 8, "learning_rate": 1e-4}
TOTAL = 16 * 8


def submit(server, job_uuid, model, data, **training):
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize",
                   json=dpo_request(job_uuid, str(model), str(data), **training), timeout=30)
    assert r.status_code == 200, r.text


def wait_for_checkpoint(server, job_uuid, timeout=120):
    deadline = time.monotonic() + timeout
    checkpoints = server.output_dir / job_uuid / "checkpoints"
    while time.monotonic() < deadline:
        done = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        if done:
            return server.status(job_uuid)
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint for {job_uuid}: {server.status(job_uuid)}")


def resumed_step(status):
    found = [w for w in status["warnings"] if w.startswith("resumed from the checkpoint at step")]
    return int(found[-1].rsplit(" ", 1)[1]) if found else None


def test_sigkill_mid_training_then_restart_resumes_to_the_same_step_count(workspace, tiny_model, seed_file):
    root = workspace / "restart-kill"
    server = StackServer(root, provider={"save_steps": 10, "logging_steps": 5}, extra_roots=[workspace]).start()
    try:
        submit(server, "done-before", tiny_model, seed_file)
        assert server.wait("done-before")["status"] == "completed"
        submit(server, "long", tiny_model, seed_file, **LONG)
        submit(server, "queued", tiny_model, seed_file)
        before = wait_for_checkpoint(server, "long")
        server.kill()
    finally:
        server.stop()
    step_at_kill = before["progress"]["step"]
    assert before["status"] == "in_progress" and 0 < step_at_kill < TOTAL

    server = StackServer(root, provider={"save_steps": 10, "logging_steps": 5}, extra_roots=[workspace],
                         port=server.port).start()
    try:
        old = server.status("done-before")
        assert old["status"] == "completed" and old["checkpoints"]
        assert httpx.get(f"{server.url}/v1/post-training/job/artifacts",
                         params={"job_uuid": "done-before"}).json()["checkpoints"] == old["checkpoints"]
        after = server.wait("long", timeout=240)
        assert after["status"] == "completed", after
        assert after["progress"]["step"] == after["progress"]["total_steps"] == TOTAL
        resumed = resumed_step(after)
        assert resumed is not None and 10 <= resumed <= step_at_kill
        print(f"\nSIGKILL at step {step_at_kill}/{TOTAL}; resumed from checkpoint step {resumed}; finished at "
              f"{after['progress']['step']}")
        assert server.wait("queued")["status"] == "completed"
        assert not (server.output_dir / "long" / "checkpoints").exists()  # finished: no resumable copies kept
    finally:
        server.stop()


def test_sigterm_saves_a_checkpoint_and_exits_in_time(workspace, tiny_model, seed_file):
    root = workspace / "restart-term"
    server = StackServer(root, provider={"save_steps": 1000, "logging_steps": 5}, extra_roots=[workspace]).start()
    try:
        submit(server, "term", tiny_model, seed_file, **LONG)
        server.wait("term", statuses=("in_progress",), predicate=lambda s: (s["progress"] or {}).get("step", 0) > 10)
        started = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=30)
        took = time.monotonic() - started
    finally:
        server.stop()
    assert took < 15, f"server took {took:.1f}s to stop"
    assert code is not None
    saved = [p for p in (root / "out" / "term" / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    assert saved, "no checkpoint saved on SIGTERM"  # save_steps 1000: only shutdown saves one

    server = StackServer(root, provider={"save_steps": 1000, "logging_steps": 5}, extra_roots=[workspace]).start()
    try:
        after = server.wait("term", timeout=240)
        assert after["status"] == "completed", after
        assert after["progress"]["step"] == TOTAL
        assert any("interrupted by server shutdown" in w for w in after["warnings"])
        assert resumed_step(after) == int(saved[0].name.split("-")[1])
    finally:
        server.stop()


def test_without_resume_interrupted_jobs_are_failed_with_the_reason(workspace, tiny_model, seed_file):
    root = workspace / "restart-noresume"
    config = {"save_steps": 10, "resume_interrupted_jobs": False}
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        submit(server, "cut", tiny_model, seed_file, **LONG)
        submit(server, "waiting", tiny_model, seed_file)
        server.wait("cut", statuses=("in_progress",))
        server.kill()
    finally:
        server.stop()
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        for job in ("cut", "waiting"):
            status = server.status(job)
            assert (status["status"], status["error"]) == ("failed", "interrupted by server shutdown"), status
            assert status["checkpoints"] == []
        submit(server, "fresh", tiny_model, seed_file)
        assert server.wait("fresh")["status"] == "completed"
    finally:
        server.stop()
