"""Issue 8's lifecycle defects against real servers: jobs that can no longer start, a job that kills
the server, a job store that refuses writes, cancel in every phase, orphaned directories, symlinks
swapped after submission, and a bounded queue with deleted jobs."""

import json
import shutil
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from stack_server import StackServer, dpo_request

pytestmark = pytest.mark.integration

LONG = {"batch_size": 1, "max_steps_per_epoch": 16, "n_epochs": 50, "learning_rate": 1e-4}


def post(server, job_uuid, model, data, route="preference-optimize", **training):
    return httpx.post(f"{server.url}/v1/post-training/{route}",
                      json=dpo_request(job_uuid, str(model), str(data), **training), timeout=60)


def submit(server, job_uuid, model, data, **training):
    r = post(server, job_uuid, model, data, **training)
    assert r.status_code == 200, r.text


def cancel(server, job_uuid):
    r = httpx.post(f"{server.url}/v1/post-training/job/cancel", json={"job_uuid": job_uuid}, timeout=30)
    assert r.status_code == 200, r.text


def listed(server):
    return [j["job_uuid"] for j in httpx.get(f"{server.url}/v1/post-training/jobs", timeout=30).json()["data"]]


def test_a_job_that_can_no_longer_start_fails_alone_after_a_restart(workspace, tiny_model, seed_file):
    root = workspace / "lifecycle-limits"
    doomed_model = root / "doomed-model"
    shutil.copytree(tiny_model, doomed_model)
    server = StackServer(root, extra_roots=[workspace]).start()
    try:
        submit(server, "running", tiny_model, seed_file, **LONG)
        submit(server, "long-rows", tiny_model, seed_file, max_seq_length=2048)
        submit(server, "model-gone", doomed_model, seed_file)
        server.wait("running", statuses=("in_progress",))
    finally:
        server.stop(signal.SIGTERM)
    shutil.rmtree(doomed_model)
    server = StackServer(root, provider={"limits": {"max_seq_length": 1024}}, extra_roots=[workspace]).start()
    try:
        cancel(server, "running")
        failed = server.wait("long-rows")
        assert failed["status"] == "failed"
        assert failed["error"].startswith("could not start:") and "max_seq_length" in failed["error"], failed
        gone = server.wait("model-gone")
        assert gone["status"] == "failed" and "doomed-model" in gone["error"], gone
        submit(server, "after", tiny_model, seed_file)
        assert server.wait("after")["status"] == "completed"
        assert "Exception in thread" not in server.log_tail(400)
    finally:
        server.stop()


def test_a_job_that_kills_the_server_is_resumed_once_then_failed(workspace, tiny_model, seed_file):
    root = workspace / "lifecycle-crash"
    config = {"save_steps": 5}
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        submit(server, "killer", tiny_model, seed_file, **LONG)
        submit(server, "behind", tiny_model, seed_file)
        server.wait("killer", statuses=("in_progress",), predicate=lambda s: (s["progress"] or {}).get("step", 0) > 6)
        server.kill()  # as the out-of-memory killer would
    finally:
        server.stop()
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        resumed = server.wait("killer", statuses=("in_progress",),
                              predicate=lambda s: (s["progress"] or {}).get("phase") == "training")
        assert resumed["attempts"] == 2
        assert any("the server died while this job was running" in w and "attempt 2" in w
                   for w in resumed["warnings"]), resumed["warnings"]
        server.kill()
    finally:
        server.stop()
    server = StackServer(root, provider=config, extra_roots=[workspace]).start()
    try:
        failed = server.status("killer")
        assert failed["status"] == "failed", failed
        assert "the server died while this job was running" in failed["error"]
        assert "out-of-memory killer" in failed["error"] and "after 2 attempt(s)" in failed["error"]
        assert server.wait("behind")["status"] == "completed"  # the queue moves on
        assert not (server.output_dir / "killer" / "checkpoints").exists()
    finally:
        server.stop()


def lock_database(path, seconds, locked: threading.Event):
    """Hold an exclusive lock on the job store's sqlite file, as another process could."""
    connection = sqlite3.connect(path, timeout=1, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    locked.set()
    time.sleep(seconds)
    connection.execute("ROLLBACK")
    connection.close()


def test_a_refused_store_write_leaves_nothing_and_completed_work_is_never_retrained(workspace, tiny_model, seed_file):
    root = workspace / "lifecycle-store"
    server = StackServer(root, extra_roots=[workspace]).start()
    db = root / "kvstore.db"
    try:
        locked = threading.Event()
        holder = threading.Thread(target=lock_database, args=(db, 7, locked))
        holder.start()
        locked.wait(5)
        refused = post(server, "phantom", tiny_model, seed_file)
        holder.join()
        assert refused.status_code == 503, refused.text
        assert "job store could not record job 'phantom'" in refused.json()["error"]["message"]
        assert "phantom" not in listed(server)
        assert httpx.get(f"{server.url}/v1/post-training/job/status", params={"job_uuid": "phantom"}).status_code == 404
        assert not (server.output_dir / "phantom").exists()
        submit(server, "phantom", tiny_model, seed_file)  # the id is free: nothing was kept
        assert server.wait("phantom")["status"] == "completed"

        # the store refuses the job's last writes; the server dies before they get through
        locked = threading.Event()
        submit(server, "unrecorded", tiny_model, seed_file)
        server.wait("unrecorded", statuses=("in_progress",))
        holder = threading.Thread(target=lock_database, args=(db, 12, locked))
        holder.start()
        locked.wait(5)
        done = server.wait("unrecorded")
        assert done["status"] == "completed"
        server.kill()
        holder.join()
    finally:
        server.stop()
    stored = sqlite3.connect(db).execute("select value from kvstore where key='job:unrecorded'").fetchone()[0]
    assert json.loads(stored)["status"] == "in_progress"  # what the store was left with
    server = StackServer(root, extra_roots=[workspace]).start()
    try:
        after = server.status("unrecorded")
        assert after["status"] == "completed", after
        assert after["attempts"] == 1 and after["checkpoints"]  # not trained again
        assert any("recorded at restart" in w for w in after["warnings"])
        assert (server.output_dir / "unrecorded" / "final" / "model.safetensors").is_file()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def guarded(workspace, tiny_model, seed_file):
    """A server with a small queue; started on a directory holding a job directory without a record."""
    root = workspace / "lifecycle-guarded"
    orphan = root / "out" / "orphan"
    (orphan / "data").mkdir(parents=True)
    (orphan / "data" / "train.jsonl").write_text("{}\n")
    server = StackServer(root, provider={"limits": {"max_queued_jobs": 3}}, extra_roots=[workspace]).start()
    yield server
    server.stop()


def test_an_orphaned_job_directory_is_set_aside_at_start(guarded, tiny_model, seed_file):
    assert (guarded.output_dir / ".orphaned" / "orphan" / "data" / "train.jsonl").is_file()
    submit(guarded, "orphan", tiny_model, seed_file)  # no 409: the id is free
    assert guarded.wait("orphan")["status"] == "completed"


def test_memory_bounds_and_unstorable_text_are_400s_with_nothing_kept(guarded, tiny_model, seed_file):
    r = post(guarded, "huge", tiny_model, seed_file, batch_size=16, max_seq_length=32768)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "limits.max_tokens_per_step" in message and "16 x 32768 x 2" in message, message
    r = post(guarded, "wide", tiny_model, seed_file, batch_size=1000)
    assert r.status_code == 400 and "limits.max_batch_size" in r.json()["error"]["message"]
    request = dpo_request("surrogate", str(tiny_model), str(seed_file))
    request["logger_config"] = {"x": "\ud800"}
    r = httpx.post(f"{guarded.url}/v1/post-training/preference-optimize", timeout=30,
                   content=json.dumps(request), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "logger_config.x" in r.json()["error"]["message"], r.text
    assert not {"huge", "wide", "surrogate"} & set(listed(guarded))
    assert not any((guarded.output_dir / name).exists() for name in ("huge", "wide", "surrogate"))


def test_a_queued_job_keeps_the_model_directory_checked_at_submission(guarded, workspace, tiny_model, seed_file,
                                                                      tmp_path):
    outside = tmp_path / "outside-model"  # not under any root, and not a loadable model
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = guarded.root / "model-link"
    link.symlink_to(tiny_model)
    submit(guarded, "blocker", tiny_model, seed_file, **LONG)
    submit(guarded, "via-link", link, seed_file)
    link.unlink()
    link.symlink_to(outside)  # swapped while the job waits
    assert post(guarded, "fresh-link", link, seed_file).status_code == 403
    cancel(guarded, "blocker")
    assert guarded.wait("via-link")["status"] == "completed"  # trained on the directory checked at submission


def test_queue_limit_and_delete_on_both_route_versions(guarded, tiny_model, seed_file):
    for name in ("q1", "q2", "q3"):
        submit(guarded, name, tiny_model, seed_file, **LONG)
    r = post(guarded, "q4", tiny_model, seed_file)
    assert r.status_code == 429 and "limits.max_queued_jobs (3)" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{guarded.url}/v1/post-training/job/delete", json={"job_uuid": "q3"}, timeout=30)
    assert r.status_code == 409 and "cancel it" in r.json()["error"]["message"]
    for name in ("q1", "q2", "q3"):
        cancel(guarded, name)
    for name in ("q1", "q2", "q3"):
        assert guarded.wait(name)["status"] == "cancelled"
    assert (guarded.output_dir / "q1" / "data").is_dir()
    r = httpx.post(f"{guarded.url}/v1/post-training/job/delete", json={"job_uuid": "q1"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{guarded.url}/v1alpha/post-training/job/delete", json={"job_uuid": "q2"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.delete(f"{guarded.url}/v1alpha/post-training/jobs/q3", timeout=30)
    assert r.status_code == 200, r.text
    for name in ("q1", "q2", "q3"):
        assert name not in listed(guarded) and not (guarded.output_dir / name).exists()
    assert httpx.delete(f"{guarded.url}/v1alpha/post-training/jobs/q3", timeout=30).status_code == 404
    submit(guarded, "q1", tiny_model, seed_file)  # a deleted id can be used again
    assert guarded.wait("q1")["status"] == "completed"


def test_cancel_during_tokenization_of_a_large_dataset(guarded, tiny_model, seed_file):
    rows = json.loads(seed_file.read_text())["data"]
    big = guarded.root / "big.jsonl"
    with big.open("w") as f:
        for i in range(200_000):
            f.write(json.dumps(rows[i % len(rows)]) + "\n")
    submit(guarded, "big", tiny_model, big)
    status = guarded.wait("big", statuses=("in_progress",), timeout=120)
    time.sleep(3)  # the tiny model loads in well under a second; then TRL tokenizes 200k rows
    status = guarded.status("big")
    assert status["status"] == "in_progress" and status["progress"]["phase"] in ("starting", "loading"), status
    asked = time.monotonic()
    cancel(guarded, "big")
    final = guarded.wait("big", timeout=60)
    took = time.monotonic() - asked
    assert final["status"] == "cancelled", final
    assert took < 10, f"cancel during tokenization took {took:.1f}s"
    print(f"\ncancelled during tokenization of 200k rows in {took:.2f}s")
    submit(guarded, "after-big", tiny_model, seed_file)
    assert guarded.wait("after-big")["status"] == "completed"
