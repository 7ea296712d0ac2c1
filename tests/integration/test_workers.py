"""Training in worker processes (real processes, gloo on the CPU): several processes per job, faults
that stay inside their job, cancel and restarts, jobs side by side, a server that never loads torch."""

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from pictures import assert_shows_curves
from stack_server import StackServer, dpo_request

pytestmark = pytest.mark.integration

# 16 rows: 4 optimizer steps of the global batch 4 per epoch
DDP_JOB = {"batch_size": 4, "n_epochs": 3, "max_steps_per_epoch": 4, "learning_rate": 5e-3}
LONG = {"batch_size": 2, "max_steps_per_epoch": 8, "n_epochs": 40, "learning_rate": 1e-4}
LOSS_TOLERANCE = 1e-4  # DDP averages the two halves' gradients: the same optimizer steps as one process


def submit(server, job_uuid, model, data, **training):
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize",
                   json=dpo_request(job_uuid, str(model), str(data), **training), timeout=60)
    assert r.status_code == 200, r.text


def torch_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch_cpu" in maps or "libtorch_cuda" in maps


def running_with_ranks(server, job_uuid, n, timeout=180):
    return server.wait(job_uuid, statuses=("in_progress",), timeout=timeout,
                       predicate=lambda s: s["progress"]["phase"] == "training" and s["progress"]["step"] >= 2
                       and len(s["resources_allocated"]["processes"]) == n)


def alive(pids) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def ddp(workspace, tiny_model, seed_file):
    """A server whose jobs run as 2 processes over gloo."""
    server = StackServer(workspace / "ddp", provider={"processes_per_job": 2, "save_steps": 4},
                         extra_roots=[workspace]).start()
    yield server
    server.stop()


def test_a_two_process_job_matches_one_process_with_the_same_global_batch(ddp, server, tiny_model, seed_file):
    submit(server, "one-process", tiny_model, seed_file, **DDP_JOB)
    submit(ddp, "two-processes", tiny_model, seed_file, **DDP_JOB)
    one, two = server.wait("one-process", timeout=240), ddp.wait("two-processes", timeout=240)
    assert one["status"] == two["status"] == "completed", (one, two)
    assert two["resources_allocated"]["world_size"] == 2 and len(two["resources_allocated"]["processes"]) == 2
    assert two["resources_allocated"]["executor"] == "local" and two["resources_allocated"]["devices"] == ["cpu"]
    assert one["progress"]["step"] == two["progress"]["step"] == 12
    print(f"\nfinal loss: 1 process {one['progress']['loss']:.6f}, 2 processes {two['progress']['loss']:.6f}")
    assert two["progress"]["loss"] == pytest.approx(one["progress"]["loss"], abs=LOSS_TOLERANCE)
    assert one["progress"]["loss"] < 0.6931 - 0.01  # it learned: the comparison is not between two untrained models
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two["checkpoints"][0]["path"])
    assert not torch_loaded(ddp.process.pid) and not torch_loaded(server.process.pid)
    # rank 0 alone draws the job's curves, in the worker: the server never loads matplotlib either
    assert_shows_curves(Path(two["progress"]["curves"]))
    assert "/matplotlib/" not in Path(f"/proc/{server.process.pid}/maps").read_text()


def test_a_killed_rank_fails_its_job_and_the_next_job_runs(ddp, tiny_model, seed_file):
    submit(ddp, "rank-killed", tiny_model, seed_file, **LONG)
    submit(ddp, "after-rank-killed", tiny_model, seed_file, **DDP_JOB)
    running = running_with_ranks(ddp, "rank-killed", 2)
    pids = [p["pid"] for p in running["resources_allocated"]["processes"]]
    os.kill(pids[1], signal.SIGKILL)
    failed = ddp.wait("rank-killed", timeout=60)
    assert failed["status"] == "failed", failed
    assert "SIGKILL" in failed["error"] and "out-of-memory killer" in failed["error"], failed["error"]
    assert failed["attempts"] == 1
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(pids) == []  # the other rank was stopped too
    assert httpx.get(f"{ddp.url}/v1/health", timeout=5).status_code == 200
    assert ddp.wait("after-rank-killed", timeout=240)["status"] == "completed"


def test_cancel_stops_every_process_of_a_job(ddp, tiny_model, seed_file):
    submit(ddp, "cancel-ddp", tiny_model, seed_file, **LONG)
    running = running_with_ranks(ddp, "cancel-ddp", 2)
    pids = [p["pid"] for p in running["resources_allocated"]["processes"]]
    asked = time.monotonic()
    r = httpx.post(f"{ddp.url}/v1/post-training/job/cancel", json={"job_uuid": "cancel-ddp"}, timeout=30)
    assert r.status_code == 200
    assert ddp.wait("cancel-ddp", timeout=30)["status"] == "cancelled"
    while alive(pids) and time.monotonic() - asked < 10:
        time.sleep(0.1)
    assert alive(pids) == [], f"ranks still alive {time.monotonic() - asked:.1f}s after cancel"
    workers = [p for p in psutil.Process(ddp.process.pid).children(recursive=True)
               if "llama_stack_provider_trl.worker" in " ".join(p.cmdline()) and "--standby" not in p.cmdline()]
    assert workers == [], [w.cmdline() for w in workers]  # the launcher too


def test_a_hung_rank_is_killed_after_the_silence_timeout(workspace, tiny_model, seed_file):
    server = StackServer(workspace / "hung", provider={"processes_per_job": 2, "worker_silence_timeout_s": 4},
                         extra_roots=[workspace]).start()
    try:
        submit(server, "hung", tiny_model, seed_file, **LONG)
        running = running_with_ranks(server, "hung", 2)
        pids = [p["pid"] for p in running["resources_allocated"]["processes"]]
        os.kill(pids[1], signal.SIGSTOP)  # rank 0 now waits forever in the next all-reduce
        failed = server.wait("hung", timeout=60)
        assert failed["status"] == "failed" and "no progress" in failed["error"], failed
        assert "worker_silence_timeout_s" in failed["error"]
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(pids) == []
    finally:
        server.stop()


def test_server_killed_during_a_two_process_job_resumes_it_from_its_checkpoint(workspace, tiny_model, seed_file):
    root = workspace / "ddp-restart"
    config = {"processes_per_job": 2, "save_steps": 4, "logging_steps": 1}
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        submit(server, "resumed-ddp", tiny_model, seed_file, **{**LONG, "n_epochs": 8})
        running = server.wait("resumed-ddp", statuses=("in_progress",), timeout=180,
                              predicate=lambda s: s["progress"]["step"] > 5)
        pids = [p["pid"] for p in running["resources_allocated"]["processes"]]
        server.kill()
    finally:
        server.stop()
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(pids) == []  # the workers died with the server
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        done = server.wait("resumed-ddp", timeout=300)
        assert done["status"] == "completed", done
        assert done["progress"]["step"] == done["progress"]["total_steps"] == 8 * 8
        assert done["attempts"] == 2 and done["resources_allocated"]["world_size"] == 2
        assert any(w.startswith("resumed from the checkpoint at step") for w in done["warnings"]), done["warnings"]
    finally:
        server.stop()


def test_two_jobs_side_by_side_and_torch_never_in_the_server(workspace, tiny_model, seed_file):
    server = StackServer(workspace / "side-by-side", provider={"max_concurrent_jobs": 2, "warm_worker": False},
                         extra_roots=[workspace]).start()
    try:
        assert not torch_loaded(server.process.pid)
        for name in ("left", "right"):
            submit(server, name, tiny_model, seed_file, **{**LONG, "n_epochs": 4})
        spans = {}
        for name in ("left", "right"):
            status = server.wait(name, timeout=240)
            assert status["status"] == "completed", status
            spans[name] = (status["started_at"], status["completed_at"])
        assert spans["left"][0] < spans["right"][1] and spans["right"][0] < spans["left"][1], spans  # overlapped
        assert not torch_loaded(server.process.pid)
    finally:
        server.stop()
