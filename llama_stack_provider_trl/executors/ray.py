"""Jobs on a Ray cluster, as Ray Train TorchTrainer runs (executor: ray).

The server connects to the cluster once, at start-up (import ray and ray.init, 2-4 s), and then submits each job as
one Ray task, `worker/ray_train.drive`, which fits a TorchTrainer with processes_per_job workers placed by
Ray. The driver runs in a Ray process rather than here because Ray Train's torch module imports torch,
which the server never does; a task rather than a subprocess per job because a subprocess would pay
ray's import and its own ray.init (about 6 s together) for every job.

Everything else is the local executor's (LocalJob): the workers run the same rank entry and write the
same events and rank files into the job's directory, which therefore must be on storage every node sees
at the same path (output_dir). Stop for a shutdown: the stop file. Cancel: the driver task is cancelled
and Ray Train aborts the run (RayJob.kill). Failures are not retried (FailureConfig max_failures=0). The
server owns every task it submits: if it dies, Ray ends its jobs too, as the local executor's die with it,
and at the next start an interrupted job resumes from its latest checkpoint, as a local one does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from ..config import TrlPostTrainingConfig
from ..worker import channel
from ..worker.channel import JobSpec
from .base import Outcome
from .local import LocalJob

log = logging.getLogger(__name__)

NAMESPACE = "llama-stack-provider-trl"
CONNECT_TIMEOUT_S = 5.0
FORCE_AFTER_S = 15.0  # a cancelled run's graceful abort normally ends its driver in a few seconds
# What Ray's workers get from the server's environment: the hub settings (offline mode, cache, token).
PASSED_ENV_PREFIXES = ("HF_",)


class RayExecutor:
    name = "ray"

    def __init__(self, config: TrlPostTrainingConfig) -> None:
        self.config = config
        self.ray = connect(config.ray_address)
        from ..worker import ray_train

        cluster_gpus = self.ray.cluster_resources().get("GPU", 0)
        self.use_gpu = config.device == "cuda" or (config.device == "auto" and cluster_gpus > 0)
        # no retries: a job's failure is reported, not replayed behind the user's back
        self._drive = self.ray.remote(num_cpus=0, max_retries=0)(ray_train.drive)

    def devices(self) -> list[str]:
        # Ray places each job's workers; the scheduler only bounds how many jobs are in flight
        return ["cpu"]

    def prepare(self) -> None:
        """Nothing to warm: the cluster is connected once, at start-up."""

    def start(self, spec: JobSpec) -> RayJob:
        job_dir = Path(spec.job_dir)
        channel.reset(job_dir)
        spec_path = spec.write()
        ref = self._drive.options(name=f"trl-job-{spec.job_uuid}").remote(str(spec_path), self.use_gpu)
        return RayJob(self.ray, ref, spec, channel.worker_dir(job_dir) / "worker.log",
                      self.config.worker_silence_timeout_s)

    def close(self) -> None:
        """Disconnect; Ray ends whatever this server's tasks still run."""
        self.ray.shutdown()


def connect(address: str):
    """ray, connected to the cluster at `address`, or a start-up error naming what is missing."""
    # importing ray installs a log record factory that adds `_ray_timestamp_ns` to every record, which the
    # server's log would print on every line: the server's own factory is put back
    factory = logging.getLogRecordFactory()
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("executor 'ray' needs Ray: install the provider's [ray] extra "
                           "(pip install 'llama-stack-provider-trl[ray]')") from exc
    finally:
        logging.setLogRecordFactory(factory)
    check_reachable(address)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False, runtime_env={"env_vars": worker_env()})
    except Exception as exc:  # noqa: BLE001 - ConnectionError, or Ray's own errors for a bad address
        raise RuntimeError(f"ray_address {address!r}: cannot connect to a Ray cluster there: {exc}") from exc
    finally:
        logging.setLogRecordFactory(factory)
    return ray


def check_reachable(address: str) -> None:
    """A host:port that nothing answers on fails at once: ray.init would retry it for minutes."""
    if address == "auto":
        return  # ray.init itself says at once when no cluster runs on this machine
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"ray_address {address!r}: expected host:port of the cluster's head, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RuntimeError(f"ray_address {address!r}: cannot reach the Ray cluster's head there ({exc}); "
                           "start it with `ray start --head`, or set TRL_RAY_ADDRESS") from exc


def worker_env() -> dict[str, str]:
    env = {
        "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
        # Ray Train's workers route print() to a logger; dill (datasets' fingerprinting) disassembles code by
        # printing into a captured sys.stdout, so the patch spilled hundreds of lines of bytecode per job
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)})
    return env


class DriverTask:
    """The job's driver task, seen as LocalJob sees a process: poll() is None while it runs."""

    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray = ray
        self.ref = ref
        self.returncode: int | None = None
        self.result: dict[str, Any] | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = self.ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self.result = self.ray.get(self.ref)
                except Exception as exc:  # noqa: BLE001 - the task itself died, or was cancelled
                    self.result = {"ok": False, "error": f"the job's Ray driver task ended: {exc}"}
                self.returncode = 0 if self.result.get("ok") else 1
        return self.returncode


class RayJob(LocalJob):
    """LocalJob's watching (events, rank files, silence timeout) over a Ray driver task."""

    def __init__(self, ray: Any, ref: Any, spec: JobSpec, log_path: Path, silence_timeout: float) -> None:
        super().__init__(DriverTask(ray, ref), spec, log_path, silence_timeout)
        self.ray = ray

    def kill(self) -> None:
        """Cancel the driver task: Ray interrupts it (SIGINT semantics), and TorchTrainer.fit's handler
        aborts the run: the controller kills the workers on whatever node they run, and removes the run's
        placement group and the detached actor that guards it. Force-killing the driver at once would
        leave that guard alive until it noticed; force comes only if the abort has not ended the driver
        within FORCE_AFTER_S (Ray then ends every actor the driver owned)."""
        self._killed = True
        self._cancel(force=False)
        timer = threading.Timer(FORCE_AFTER_S, self._force)
        timer.daemon = True
        timer.start()

    def _force(self) -> None:
        if self.process.poll() is None:
            log.warning("job %s: its Ray run did not abort in %.0f s; force-cancelling its driver",
                        self.spec.job_uuid, FORCE_AFTER_S)
            self._cancel(force=True)

    def _cancel(self, force: bool) -> None:
        try:
            self.ray.cancel(self.process.ref, force=force)
        except Exception:  # noqa: BLE001 - already finished
            pass

    def _outcome(self, end: dict[str, Any] | None, errors: list[dict[str, Any]], silenced: bool) -> Outcome:
        if end is None and not silenced and not self._killed:
            self.process.poll()
            result = self.process.result or {}
            # a worker that died (a signal, a lost node) is the cause; the other ranks' errors follow from it
            if result.get("error") and (result.get("worker_died") or not errors):
                return Outcome("failed", error=result["error"])
        return super()._outcome(end, errors, silenced)
