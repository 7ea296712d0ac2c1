"""The ray executor on a real Ray cluster of one machine: `ray start --head --num-cpus 2` on loopback, in a
temporary directory of its own, stopped (every process of it) when the module ends. One server with
TRL_EXECUTOR=ray's settings; a 2-worker DPO job checked against the local executor, and a cancelled job
checked with Ray's state API. Start-up errors and failure messages: tests/unit/test_ray_executor.py."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest
from ray_cluster import RayHead
from stack_server import StackServer, dpo_request

from llama_stack_provider_trl.executors.ray import NAMESPACE

pytestmark = pytest.mark.integration

# 16 rows: 4 optimizer steps of the global batch 4 per epoch, as in test_workers.py
DDP_JOB = {"batch_size": 4, "n_epochs": 3, "max_steps_per_epoch": 4, "learning_rate": 5e-3}
LONG = {"batch_size": 2, "max_steps_per_epoch": 8, "n_epochs": 40, "learning_rate": 1e-4}
# gloo all-reduce averages the two workers' gradients: the same optimizer steps as one process, up to
# float summation order (test_workers.py's local 2-process job is held to the same tolerance)
LOSS_TOLERANCE = 1e-4


def torch_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch_cpu" in maps or "libtorch_cuda" in maps


def ray_loaded(pid: int) -> bool:
    return "_raylet" in Path(f"/proc/{pid}/maps").read_text()


def submit(server, job_uuid, model, data, **training):
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize",
                   json=dpo_request(job_uuid, str(model), str(data), **training), timeout=60)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def ray_cluster():
    head = RayHead(cpus=2).start()
    try:
        yield {"address": head.address}
    finally:
        assert head.stop() == [], "Ray processes left running"


@pytest.fixture(scope="module")
def ray_server(ray_cluster, workspace, tiny_model, seed_file):
    server = StackServer(workspace / "ray", extra_roots=[workspace], provider={
        "executor": "ray", "ray_address": ray_cluster["address"], "processes_per_job": 2}).start()
    yield server
    server.stop()


def test_a_two_worker_ray_job_trains_like_the_local_executor(ray_server, ray_cluster, server, tiny_model, seed_file):
    submit(server, "ray-baseline", tiny_model, seed_file, **DDP_JOB)
    submit(ray_server, "ray-two-workers", tiny_model, seed_file, **DDP_JOB)
    training = ray_server.wait("ray-two-workers", statuses=("in_progress", "completed", "failed"), timeout=300,
                               predicate=lambda s: s["status"] != "in_progress" or s["progress"].get("loss") is not None)
    # progress while it trains (the first step is always logged); 12 steps take seconds, polled every 0.1 s
    assert training["status"] == "in_progress" and training["progress"]["step"] >= 1, training
    local, ray = server.wait("ray-baseline", timeout=240), ray_server.wait("ray-two-workers", timeout=300)
    assert local["status"] == ray["status"] == "completed", (local, ray, ray_server.log_tail())
    resources = ray["resources_allocated"]
    assert resources["executor"] == "ray" and resources["world_size"] == 2, resources
    assert [p["rank"] for p in resources["processes"]] == [0, 1], resources
    from ray.util.state import list_nodes

    nodes = {node.node_ip for node in list_nodes(address=ray_cluster["address"])}
    assert all(p["address"] in nodes and p["pid"] > 0 for p in resources["processes"]), (resources, nodes)
    assert ray["progress"]["step"] == local["progress"]["step"] == 12
    print(f"\nfinal loss: local 1 process {local['progress']['loss']:.6f}, ray 2 workers {ray['progress']['loss']:.6f}")
    assert ray["progress"]["loss"] == pytest.approx(local["progress"]["loss"], abs=LOSS_TOLERANCE)
    assert local["progress"]["loss"] < 0.6931 - 0.01  # it learned
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ray["checkpoints"][0]["path"])
    log = (ray_server.output_dir / "ray-two-workers" / "worker" / "worker.log").read_text()
    assert "LOAD_FAST" not in log, log[-3000:]  # no bytecode dumps from datasets' fingerprinting (dill)
    assert ray_loaded(ray_server.process.pid) and not torch_loaded(ray_server.process.pid)
    assert not ray_loaded(server.process.pid)  # the local executor's server never imports ray


def test_cancel_leaves_no_actor_or_process_of_the_job(ray_server, ray_cluster, tiny_model, seed_file):
    from ray.util.state import list_actors

    submit(ray_server, "ray-cancel", tiny_model, seed_file, **LONG)
    # both workers running the job (loading the model); cancelling then spares the test their imports
    running = ray_server.wait("ray-cancel", statuses=("in_progress",), timeout=240,
                              predicate=lambda s: len(s["resources_allocated"]["processes"]) == 2)
    pids = [p["pid"] for p in running["resources_allocated"]["processes"]]
    # the server's jobs run in its own namespace; Ray Train's shared, detached AutoscalingCoordinator does not
    ours = [("state", "=", "ALIVE"), ("ray_namespace", "=", NAMESPACE)]
    alive = list_actors(address=ray_cluster["address"], filters=ours)
    assert {a.pid for a in alive} >= set(pids), alive  # the workers are actors of the job, and listed
    r = httpx.post(f"{ray_server.url}/v1/post-training/job/cancel", json={"job_uuid": "ray-cancel"}, timeout=30)
    assert r.status_code == 200
    assert ray_server.wait("ray-cancel", timeout=30)["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        actors = list_actors(address=ray_cluster["address"], filters=ours)
        if not actors and not any(psutil.pid_exists(pid) for pid in pids):
            break
        time.sleep(0.5)
    assert actors == [], [(a.class_name, a.pid) for a in actors]
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []
