"""The seed README's flow, end to end: build the tiny model, start `llama stack run run.yaml`,
register test_dpo_data.json, send the seed's DPO request, poll status with progress, print the artifacts.
Then a job that visibly learns (the seed's learning rate leaves the tiny model's loss at 0.6931): its logged
metrics step by step, and where its curves picture is.

Run it through scripts/demo.sh, which installs everything first. `--serve` keeps the server running
afterwards (until Ctrl-C), for the README's examples. Environment: DEMO_PORT (default 8321). Each run starts
from an empty out/demo (the server's SQLITE_STORE_DIR and TRL_OUTPUT_DIR), so the README's fixed job ids
can be used again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

PORT = int(os.environ.get("DEMO_PORT", "8321"))
URL = f"http://localhost:{PORT}"
STATE = REPO / "out" / "demo"


def show(title: str, obj) -> None:
    print(f"\n=== {title}")
    print(json.dumps(obj, indent=2) if not isinstance(obj, str) else obj)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="keep the server running after the demo, until Ctrl-C")
    args = parser.parse_args()
    model = REPO / "models" / "tiny-llama"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), str(model),
                        "--corpus", str(REPO / "test_dpo_data.json")], check=True)
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SQLITE_STORE_DIR": str(STATE), "TRL_OUTPUT_DIR": str(STATE / "post_training")}
    log = (STATE / "server.log").open("w")
    print(f"starting: llama stack run run.yaml --port {PORT}   (log: {STATE / 'server.log'})")
    server = subprocess.Popen([str(Path(sys.executable).with_name("llama")), "stack", "run", "run.yaml", "--port",
                               str(PORT)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{URL}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"server did not start; see {STATE / 'server.log'}")
        providers = httpx.get(f"{URL}/v1/providers").json()["data"]
        show("provider", [p for p in providers if p["api"] == "post_training"][0]["provider_type"])

        rows = json.loads((REPO / "test_dpo_data.json").read_text())["data"]
        r = httpx.post(f"{URL}/v1beta/datasets", json={"dataset_id": "dpo-demo", "purpose": "eval/question-answer",
                                                        "source": {"type": "rows", "rows": rows}})
        r.raise_for_status()
        show("registered dataset", f"dpo-demo: {len(rows)} preference pairs")

        job_uuid = f"dpo-training-{int(time.time())}"
        request = {  # the seed README's payload, with this repo's tiny model
            "job_uuid": job_uuid,
            "finetuned_model": "./models/tiny-llama",
            "algorithm_config": {"type": "dpo", "reward_scale": 1.0, "reward_clip": 5.0},
            "training_config": {"n_epochs": 1, "max_steps_per_epoch": 100, "batch_size": 4, "learning_rate": 1e-6,
                                "dataset": "dpo-demo"},
        }
        submit("POST /v1/post-training/preference-optimize", request)
        status = poll(job_uuid)
        show("final status", status)
        artifacts = httpx.get(f"{URL}/v1/post-training/job/artifacts", params={"job_uuid": job_uuid}).json()
        show("GET /v1/post-training/job/artifacts", artifacts)
        if status["status"] != "completed":
            return 1
        path = artifacts["checkpoints"][0]["path"]
        print(f"\nLoad it with: AutoModelForCausalLM.from_pretrained({path!r})")
        if learn() != "completed":
            return 1
        if args.serve:
            print(f"\n=== serving on {URL} (the README's examples run against it); Ctrl-C stops it")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def submit(title: str, request: dict) -> None:
    """Send a DPO request, printing it and the answer."""
    show(title, request)
    r = httpx.post(f"{URL}/v1/post-training/preference-optimize", json=request, timeout=60)
    show(f"-> {r.status_code}", r.json())
    r.raise_for_status()


def poll(job_uuid: str, every: bool = True) -> dict:
    """Poll a job's status until it ends, printing its progress (every poll, or only the last)."""
    print(f"\n=== polling /v1/post-training/job/status?job_uuid={job_uuid}")
    while True:
        status = httpx.get(f"{URL}/v1/post-training/job/status", params={"job_uuid": job_uuid}).json()
        p = status.get("progress") or {}
        m = p.get("metrics", {})
        final = status["status"] in ("completed", "failed", "cancelled")
        if every or final:
            print(f"  {status['status']:<11} phase={p.get('phase')} step {p.get('step')}/{p.get('total_steps')} "
                  f"loss={p.get('loss')} rewards/margins={m.get('rewards/margins')} "
                  f"rewards/accuracies={m.get('rewards/accuracies')} tok/s={p.get('tokens_per_second')}")
        if final:
            return status
        time.sleep(0.5)


def learn() -> str:
    """The seed's request (4 steps at learning rate 1e-6) barely moves the tiny model: its loss stays at
    log 2 = 0.6931, where DPO starts. This job trains the same model on the same pairs at a learning rate
    the tiny model learns at, 10 epochs of 4 steps, and the loss visibly falls and the reward margin rises."""
    job_uuid = f"dpo-learning-{int(time.time())}"
    request = {
        "job_uuid": job_uuid,
        "finetuned_model": "./models/tiny-llama",
        "algorithm_config": {"beta": 0.1, "loss_type": "sigmoid"},
        "training_config": {"n_epochs": 10, "max_steps_per_epoch": 4, "batch_size": 4, "learning_rate": 5e-3,
                            "dataset": "dpo-demo"},
    }
    submit("a job that learns: POST /v1/post-training/preference-optimize", request)
    status = poll(job_uuid, every=False)
    # the same job through the OpenAI fine-tuning routes: one metrics event per logged step, newest first
    r = httpx.get(f"{URL}/v1/fine_tuning/jobs/{job_uuid}/events", params={"limit": 100}, timeout=30)
    r.raise_for_status()
    metrics = [e["data"] for e in reversed(r.json()["data"]) if e["type"] == "metrics"]
    print(f"\n=== its metrics events (GET /v1/fine_tuning/jobs/{job_uuid}/events)")
    for m in metrics:
        print(f"  step {m['step']:>2}/{m['total_steps']}  loss={m['train_loss']:.4f}  "
              f"rewards/margins={m['train_reward_margin']:+.4f}  rewards/accuracies={m['train_reward_accuracy']:.2f}")
    curves = (status.get("progress") or {}).get("curves")
    print(f"\n=== its training curves (loss, reward margin, reward accuracy): {curves}")
    return status["status"]


if __name__ == "__main__":
    sys.exit(main())
