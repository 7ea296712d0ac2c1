"""Start and stop a real `llama stack run` server for integration tests and benchmarks."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
FINAL = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cli() -> str:
    candidate = Path(sys.executable).with_name("llama")
    return str(candidate) if candidate.exists() else "llama"


class StackServer:
    """A `llama stack run` process on a loopback port, its state under `root`.

    The run config is the repo's run.yaml with paths pointed into `root`, so
    what the tests run is what users run. `provider` overrides provider config keys. With `token`
    (a server whose run_overrides switch `server.auth` on), the helpers send it as a bearer token.
    """

    def __init__(self, root: Path, provider: dict[str, Any] | None = None, port: int | None = None,
                 extra_roots: list[Path] | None = None, run_overrides: dict[str, Any] | None = None,
                 token: str | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.provider_overrides = provider or {}
        self.extra_roots = extra_roots or []
        self.run_overrides = run_overrides or {}
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.process: subprocess.Popen | None = None
        self.log_path = root / "server.log"
        self.config_path = root / "run.yaml"

    @property
    def output_dir(self) -> Path:
        return Path(self.provider_config()["output_dir"])

    def provider_config(self) -> dict[str, Any]:
        base = yaml.safe_load((REPO / "run.yaml").read_text())["providers"]["post_training"][0]["config"]
        config = copy.deepcopy(base)
        roots = [str(self.root), *map(str, self.extra_roots)]
        config.update(device="cpu", output_dir=str(self.root / "out"), model_roots=roots, dataset_roots=roots)
        config.update(self.provider_overrides)
        return config

    def write_config(self) -> Path:
        run = yaml.safe_load((REPO / "run.yaml").read_text())
        run["external_apis_dir"] = str(REPO / "apis.d")
        run["providers"]["post_training"][0]["config"] = self.provider_config()
        for backend in run["storage"]["backends"].values():
            backend["db_path"] = str(self.root / Path(backend["db_path"]).name)
        for files in run["providers"].get("files", []):
            files["config"]["storage_dir"] = str(self.root / "files")
        run.update(self.run_overrides)
        self.config_path.write_text(yaml.safe_dump(run, sort_keys=False))
        return self.config_path

    def start(self, timeout: float = 90) -> StackServer:
        self.write_config()
        # tests never reach the Hugging Face hub: offline mode makes hub ids fail at once, without traffic
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [llama_cli(), "stack", "run", str(self.config_path), "--port", str(self.port)],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/health", headers=self.headers, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # ---- API helpers ----

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def status(self, job_uuid: str) -> dict:
        r = httpx.get(f"{self.url}/v1/post-training/job/status", params={"job_uuid": job_uuid},
                      headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, job_uuid: str, statuses=FINAL, timeout: float = 180, predicate=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_uuid)
            if status["status"] in statuses and (predicate is None or predicate(status)):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_uuid} still {status['status']} after {timeout}s: {status}\n{self.log_tail()}")
            time.sleep(0.1)

    def register_rows(self, dataset_id: str, rows: list[dict]) -> None:
        r = httpx.post(f"{self.url}/v1beta/datasets", headers=self.headers, timeout=30, json={
            "dataset_id": dataset_id, "purpose": "eval/question-answer", "source": {"type": "rows", "rows": rows}})
        r.raise_for_status()


def dpo_request(job_uuid: str, model: str, dataset: str, **training: Any) -> dict:
    """The seed README's payload shape."""
    tc = {"n_epochs": 1, "max_steps_per_epoch": 100, "batch_size": 4, "learning_rate": 1e-6, "dataset": dataset}
    tc.update(training)
    return {
        "job_uuid": job_uuid,
        "finetuned_model": model,
        "algorithm_config": {"type": "dpo", "reward_scale": 1.0, "reward_clip": 5.0},
        "training_config": tc,
    }
