"""A job on a Ray cluster: the Ray Train driver, and what each of its workers runs.

Both run in Ray's processes, never in the server (Ray Train's torch module imports torch): the server
submits `drive` as a Ray task (executors/ray.py), the task runs the job as a `TorchTrainer`, and Ray
Train places `processes_per_job` workers across the cluster's nodes, sets RANK/WORLD_SIZE and the
torch.distributed process group (gloo on CPUs, NCCL on GPUs). Each worker then runs the same rank entry
as under torchrun (worker/main.py `run`): the same spec, events and rank files in the job's directory on
shared storage, so progress, stop-for-shutdown and errors reach the server exactly as with the local
executor. Ray carries no job data between nodes; the shared output_dir does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .channel import JobSpec, worker_dir
from .main import redirect_output, run

# Ray Train keeps its own run state here, beside the job's checkpoints (RunConfig storage_path/name)
RAY_DIR = "ray"


def drive(spec_path: str, use_gpu: bool) -> dict[str, Any]:
    """The Ray task that is the job's driver: fit a TorchTrainer and say how it ended. No retries
    (FailureConfig max_failures=0): a failed worker or a lost node fails the job, with Ray's reason."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = JobSpec.read(Path(spec_path))
    trainer = TorchTrainer(
        train_rank,
        train_loop_config={"spec": spec_path},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.world_size, use_gpu=use_gpu),
        run_config=RunConfig(name=RAY_DIR, storage_path=spec.job_dir, failure_config=FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - reported to the server, which fails the job with it
        return {"ok": False, **describe_ray_failure(exc)}
    return {"ok": True}


def train_rank(config: dict[str, Any]) -> None:
    """One Ray Train worker: the job's rank entry, its output appended to the job's worker.log."""
    import ray

    spec = JobSpec.read(Path(config["spec"]))
    redirect_output(worker_dir(Path(spec.job_dir)) / "worker.log")
    if run(spec, address=ray.util.get_node_ip_address()) != 0:
        # the rank's own error is already in the job's events, where the server reads it
        raise RuntimeError(f"rank {os.environ.get('RANK')} failed (its error is in the job's status)")


def describe_ray_failure(exc: BaseException) -> dict[str, Any]:
    """{"error", "worker_died"}: Ray Train's failure in a sentence. A worker process that died (a signal, a
    lost node) is the cause of the others' errors, so it is named alone; a worker that raised has already
    reported its own error through the job's events, which the server prefers."""
    from ray.exceptions import RayActorError

    failures = getattr(exc, "worker_failures", None) or {}
    died = {rank: error for rank, error in failures.items()
            if isinstance(error, RayActorError) or "actor died" in str(error)}
    if died:
        ranks = ", ".join(f"rank {rank}" for rank in sorted(died))
        return {"worker_died": True, "error": (
            f"{ranks}: its Ray worker process died ({_exit_detail(died[min(died)])}): the kernel's out-of-memory "
            "killer, a crash, or the loss of its node is the usual cause; not retried (FailureConfig max_failures=0)")}
    if failures:
        parts = "; ".join(f"rank {rank}: {_first_line(error)}" for rank, error in sorted(failures.items()))
        return {"worker_died": False, "error": f"Ray Train worker failed: {parts}"}
    return {"worker_died": False, "error": f"Ray Train failed: {_first_line(exc)}"}


def _exit_detail(error: BaseException) -> str:
    """Ray's reason for an actor's death ("Worker exit detail: ..."), else its message's first line."""
    match = re.search(r"exit detail: ([^\n]*?)(?: (?:Some common causes|There are some potential root causes)|\n|$)",
                      str(error))
    return match.group(1).strip().rstrip(".") if match else _first_line(error)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:500]
