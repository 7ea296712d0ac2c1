"""Training in worker processes, measured: warm jobs against plain TRL, the first job after start-up against a
warm one, status polling at 20 per second against once a second, the server's own memory before and after a
job, and 1 against 2 processes per job on the CPU. Every comparison is made in the same run, alternated.

    .venv/bin/python bench/workers.py              # 2 rounds, tiny and 34m presets (~12 min on 2 cores)
    .venv/bin/python bench/workers.py --rounds 1

Writes bench/results/workers-<time>.json and prints the table that bench/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common  # noqa: E402
from common import DATASET_ID, RESULTS, WORKSPACE  # noqa: E402
from run import LatencyProbe, log, run_plain, run_provider_job  # noqa: E402
from stack_server import StackServer  # noqa: E402

SPARE_READY_S = 15  # the warm worker imports torch, transformers and TRL in about 5-8 s on 2 cores


def server_rss(server: StackServer) -> int:
    """The server process alone: its workers are other processes, and go away after their job."""
    return psutil.Process(server.process.pid).memory_info().rss


def start(tag: str, **provider) -> StackServer:
    root = WORKSPACE / "servers" / tag
    shutil.rmtree(root, ignore_errors=True)
    server = StackServer(root, provider=provider, extra_roots=[WORKSPACE]).start()
    server.register_rows(DATASET_ID, common.make_rows())
    return server


def warm_round(tag: str, models: dict[str, Path], steps: int) -> dict:
    """One server: its first job at once after start-up, then warm jobs, then a job polled 20 times a second."""
    out: dict = {}
    server = start(tag)
    try:
        out["server_rss_idle"] = server_rss(server)
        first = run_provider_job(server, models["tiny"], f"{tag}-first", steps)
        log(f"  first tiny job right after start-up: {first['wall_s']:.2f} s (queue to start {first['queue_to_start_s']:.2f} s)")
        out["tiny_first"] = first
        for preset in ("tiny", "34m"):
            time.sleep(SPARE_READY_S)
            job = run_provider_job(server, models[preset], f"{tag}-{preset}-warm", steps)
            log(f"  warm {preset} job: {job['wall_s']:.2f} s (train {job['train_s']} s)")
            out[f"{preset}_warm"] = job
        out["server_rss_after_34m"] = server_rss(server)
        time.sleep(SPARE_READY_S)
        polled = run_provider_job(server, models["34m"], f"{tag}-34m-polled", steps, probe=True)
        log(f"  34m job polled 20/s: {polled['wall_s']:.2f} s (train {polled['train_s']} s), status p50/p99 "
            f"{polled['status_latency']['p50_ms']:.1f}/{polled['status_latency']['p99_ms']:.1f} ms")
        out["34m_polled_20hz"] = polled
    finally:
        server.stop()
        shutil.rmtree(server.root / "out", ignore_errors=True)
    return out


def two_process_round(tag: str, model: Path, steps: int) -> dict:
    server = start(tag, processes_per_job=2)
    try:
        job = run_provider_job(server, model, f"{tag}-34m-2proc", steps)
        log(f"  34m job, 2 processes: {job['wall_s']:.2f} s (train {job['train_s']} s)")
        return {"34m_2proc": job}
    finally:
        server.stop()
        shutil.rmtree(server.root / "out", ignore_errors=True)


def med(rounds: list[dict], key: str, field: str = "wall_s") -> float:
    return common.median([r[key][field] for r in rounds if key in r])


def table(rounds: list[dict]) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    rows = [
        ("tiny warm job vs plain TRL (load+train+save)", med(rounds, "tiny_warm"), med(rounds, "plain_tiny"), "+"),
        ("34m warm job vs plain TRL (load+train+save)", med(rounds, "34m_warm"), med(rounds, "plain_34m"), "x"),
        ("first tiny job after start-up vs a warm one", med(rounds, "tiny_first"), med(rounds, "tiny_warm"), "+"),
        ("34m training time, status 20/s vs 1/s", med(rounds, "34m_polled_20hz", "train_s"),
         med(rounds, "34m_warm", "train_s"), "x"),
        ("34m job, 2 processes vs 1 (request to completed)", med(rounds, "34m_2proc"), med(rounds, "34m_warm"), "x"),
    ]
    lines = ["| comparison | measured | baseline | difference |", "|---|---|---|---|"]
    for name, a, b, kind in rows:
        diff = f"{a - b:+.2f} s" if kind == "+" else ratio(a, b)
        lines.append(f"| {name} | {a:.2f} s | {b:.2f} s | {diff} |")
    idle = common.median([r["server_rss_idle"] for r in rounds]) / 2**20
    after = common.median([r["server_rss_after_34m"] for r in rounds]) / 2**20
    lines.append(f"| server RSS, idle before the first job vs after a 34m job | {after:.0f} MiB | {idle:.0f} MiB | "
                 f"{after - idle:+.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=common.JOB["steps"])
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    common.data_file()
    models = {preset: common.model_dir(preset) for preset in ("tiny", "34m")}
    result = {"mode": "workers", "cpu": common.cpu_info(), "job": common.JOB, "steps": args.steps,
              "command": " ".join(sys.argv), "rounds": []}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}, load {common.cpu_info()['loadavg_1m']:.1f}")
        entry: dict = {}
        sides = ["plain", "provider"] if r % 2 == 0 else ["provider", "plain"]
        for side in sides:
            if side == "plain":
                entry["plain_tiny"] = run_plain("tiny", models["tiny"], f"w{r}-tiny", args.steps)
                entry["plain_34m"] = run_plain("34m", models["34m"], f"w{r}-34m", args.steps)
            else:
                entry.update(warm_round(f"workers-r{r}", models, args.steps))
                entry.update(two_process_round(f"workers2-r{r}", models["34m"], args.steps))
        result["rounds"].append(entry)
    result["table"] = table(result["rounds"])
    print(result["table"])
    path = RESULTS / f"workers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
