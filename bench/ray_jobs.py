"""Per-job overhead of each way to run a job: local 1 process (forked by the warm worker), local 2 processes
(torchrun over gloo), and Ray 2 workers (a Ray Train TorchTrainer on a one-machine Ray cluster started here,
`ray start --head --num-cpus 2`). The same tiny DPO job everywhere; overhead = request to completed minus the
training time the job reports (progress.elapsed_seconds). Jobs alternate between the three servers.

    .venv/bin/python bench/ray_jobs.py              # 2 rounds (~5 min on 2 cores)
    .venv/bin/python bench/ray_jobs.py --rounds 1

Also times the Ray job's phases (request to its ranks' registration, to the first training step) and the
servers' start-up (the ray server connects to the cluster once there). Writes bench/results/ray-<time>.json
and prints the table that bench/RESULTS.md quotes. Needs the [ray] extra.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common  # noqa: E402
from common import DATASET_ID, RESULTS, WORKSPACE  # noqa: E402
from ray_cluster import RayHead  # noqa: E402
from run import log, run_provider_job  # noqa: E402
from stack_server import StackServer  # noqa: E402

WARM_S = 15  # the local server's fork server imports torch/transformers/TRL after start-up
SIDES = ("local_1", "local_2", "ray_2")


def start(tag: str, **provider) -> tuple[StackServer, float]:
    root = WORKSPACE / "servers" / tag
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    server = StackServer(root, provider=provider, extra_roots=[WORKSPACE]).start(timeout=180)
    started = time.perf_counter() - t0
    server.register_rows(DATASET_ID, common.make_rows())
    return server, started


class Phases(threading.Thread):
    """When the job's ranks registered, and when its first step was reported, from status polled 20/s."""

    def __init__(self, server: StackServer, job_uuid: str) -> None:
        super().__init__(daemon=True)
        self.server, self.job_uuid = server, job_uuid
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                s = self.server.status(self.job_uuid)
            except Exception:  # noqa: BLE001 - not submitted yet
                time.sleep(0.05)
                continue
            now = round(time.perf_counter() - self.t0, 2)
            if (s.get("resources_allocated") or {}).get("processes"):
                self.marks.setdefault("ranks_registered_s", now)
            if (s.get("progress") or {}).get("step", 0) >= 1:
                self.marks.setdefault("first_step_s", now)
            if s["status"] in ("completed", "failed", "cancelled"):
                return
            time.sleep(0.05)


def one_job(server: StackServer, model: Path, job_uuid: str, steps: int) -> dict:
    phases = Phases(server, job_uuid)
    phases.start()
    job = run_provider_job(server, model, job_uuid, steps)
    phases.done.set()
    phases.join()
    job["overhead_s"] = round(job["wall_s"] - job["train_s"], 3)
    return {**job, **phases.marks}


def table(rounds: list[dict], starts: dict[str, float]) -> str:
    names = {"local_1": "local, 1 process (forked by the warm worker)", "local_2": "local, 2 processes (torchrun, gloo)",
             "ray_2": "Ray, 2 workers (TorchTrainer, gloo)"}
    lines = ["| executor | request to completed | training (reported) | per-job overhead | to ranks registered | "
             "to first step | server start-up |", "|---|---|---|---|---|---|---|"]
    for side in SIDES:
        jobs = [r[side] for r in rounds]
        med = {k: common.median([j[k] for j in jobs if k in j]) for k in
               ("wall_s", "train_s", "overhead_s", "ranks_registered_s", "first_step_s")}
        lines.append(f"| {names[side]} | {med['wall_s']:.2f} s | {med['train_s']:.2f} s | **{med['overhead_s']:.2f} s** | "
                     f"{med['ranks_registered_s']:.2f} s | {med['first_step_s']:.2f} s | {starts[side]:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=common.JOB["steps"])
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    common.data_file()
    model = common.model_dir("tiny")
    result = {"mode": "ray", "cpu": common.cpu_info(), "job": common.JOB, "steps": args.steps,
              "command": " ".join(sys.argv), "rounds": []}
    t0 = time.perf_counter()
    head = RayHead(cpus=2).start()
    result["ray_head_start_s"] = round(time.perf_counter() - t0, 2)
    servers: dict[str, StackServer] = {}
    starts: dict[str, float] = {}
    try:
        for side, provider in (("local_1", {}), ("local_2", {"processes_per_job": 2}),
                               ("ray_2", {"executor": "ray", "ray_address": head.address, "processes_per_job": 2})):
            servers[side], starts[side] = start(f"ray-bench-{side}", **provider)
            log(f"{side} server up in {starts[side]:.1f} s")
        time.sleep(WARM_S)
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}, load {common.cpu_info()['loadavg_1m']:.1f}")
            entry = {}
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                entry[side] = one_job(servers[side], model, f"r{r}-{side}", args.steps)
                log(f"  {side}: {entry[side]['wall_s']:.2f} s, train {entry[side]['train_s']} s, "
                    f"overhead {entry[side]['overhead_s']:.2f} s, loss {entry[side]['loss']}")
                time.sleep(WARM_S if side == "local_1" else 1)  # the next local_1 job gets a warm fork server
            result["rounds"].append(entry)
    finally:
        for server in servers.values():
            server.stop()
            shutil.rmtree(server.root / "out", ignore_errors=True)
        left = head.stop()
        if left:
            log(f"Ray processes left running: {left}")
    result["server_start_s"] = starts
    result["table"] = table(result["rounds"], starts)
    print(result["table"])
    path = RESULTS / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
