"""Cancel, faults and load on a real server: each ends one job, never the server."""

import time

import httpx
import pytest
import torch
from stack_server import dpo_request
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration

LONG = {"batch_size": 1, "max_steps_per_epoch": 16, "n_epochs": 50}


def submit(server, job_uuid, model, data, **training):
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize",
                   json=dpo_request(job_uuid, str(model), str(data), **training), timeout=30)
    assert r.status_code == 200, r.text


def test_cancel_running_and_scheduled_jobs(server, tiny_model, seed_file):
    submit(server, "to-cancel", tiny_model, seed_file, **LONG)
    submit(server, "waiting-cancel", tiny_model, seed_file)
    running = server.wait("to-cancel", statuses=("in_progress",),
                          predicate=lambda s: (s["progress"] or {}).get("step", 0) >= 3)
    assert server.status("waiting-cancel")["status"] == "scheduled"

    r = httpx.post(f"{server.url}/v1alpha/post-training/jobs/waiting-cancel/cancel")
    assert r.status_code == 200, r.text
    assert server.status("waiting-cancel")["status"] == "cancelled"  # at once: it never started

    asked = time.monotonic()
    r = httpx.post(f"{server.url}/v1/post-training/job/cancel", json={"job_uuid": "to-cancel"})
    assert r.status_code == 200, r.text
    final = server.wait("to-cancel", timeout=30)
    took = time.monotonic() - asked
    assert final["status"] == "cancelled", final
    assert took < 5, f"cancel took {took:.1f}s"
    assert final["progress"]["step"] < final["progress"]["total_steps"]
    assert final["checkpoints"] == []
    assert not (server.output_dir / "to-cancel" / "checkpoints").exists()
    waited = server.status("waiting-cancel")
    assert waited["started_at"] is None and waited["status"] == "cancelled"
    print(f"\ncancelled at step {final['progress']['step']}/{running['progress']['total_steps']} in {took:.2f}s")

    submit(server, "after-cancel", tiny_model, seed_file)
    assert server.wait("after-cancel")["status"] == "completed"


def test_unreadable_model_fails_the_job_and_the_next_one_runs(server, workspace, tiny_model, seed_file):
    broken = workspace / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    submit(server, "broken", broken, seed_file)
    submit(server, "after-broken", tiny_model, seed_file)
    failed = server.wait("broken")
    assert failed["status"] == "failed"
    assert "broken-model" in failed["error"] and failed["checkpoints"] == []
    assert server.wait("after-broken")["status"] == "completed"


def test_nan_loss_fails_the_job_with_its_reason(server, workspace, tiny_model, seed_file):
    poisoned = workspace / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(poisoned)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (poisoned / name).write_bytes((tiny_model / name).read_bytes())
    submit(server, "nan", poisoned, seed_file)
    failed = server.wait("nan")
    assert failed["status"] == "failed", failed
    assert "loss became nan" in failed["error"]
    assert failed["checkpoints"] == [] and not (server.output_dir / "nan" / "final").exists()


def test_hub_id_without_network_says_so(server, seed_file):
    submit(server, "hub", "some-org/some-model-that-is-not-here", seed_file)
    failed = server.wait("hub", timeout=120)
    assert failed["status"] == "failed"
    assert "not a local model directory" in failed["error"] and "hub" in failed["error"]


def test_twenty_jobs_at_once_run_one_at_a_time_in_order(server, tiny_model, seed_file):
    names = [f"load-{i:02d}" for i in range(20)]
    for name in names:
        submit(server, name, tiny_model, seed_file, max_steps_per_epoch=1)
    finals = [server.wait(name, timeout=300) for name in names]
    assert all(s["status"] == "completed" for s in finals), [s["status"] for s in finals]
    for earlier, later in zip(finals, finals[1:]):
        assert earlier["started_at"] < later["started_at"]  # submission order
        assert earlier["completed_at"] <= later["started_at"]  # one at a time


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs: room for a job's data snapshot, not for the tiny model's 560 KB of weights."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_saving_fails_the_job_cleanly(workspace, tiny_model, seed_file, small_disk):
    from stack_server import StackServer

    server = StackServer(workspace / "disk-full", provider={"output_dir": str(small_disk)},
                         extra_roots=[workspace]).start()
    try:
        submit(server, "no-room", tiny_model, seed_file)
        failed = server.wait("no-room")
        assert failed["status"] == "failed", failed
        assert failed["error"].startswith("disk full while writing"), failed["error"]
        assert failed["checkpoints"] == []
        leftovers = {p.name for p in (small_disk / "no-room").iterdir()}
        # no half-written model (or picture) left behind; its log, metrics and curves stay for diagnosis
        assert {"data", "worker", "metrics.jsonl"} <= leftovers <= {"data", "worker", "metrics.jsonl", "curves.png"}, \
            leftovers
        assert httpx.get(f"{server.url}/v1/health").status_code == 200
    finally:
        server.stop()
