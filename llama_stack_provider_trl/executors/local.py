"""Jobs in worker processes on this machine.

A one-process job runs in the warm spare when there is one (a worker that has already imported the
training stack), else in a fresh `python -m llama_stack_provider_trl.worker`. A job of several
processes runs under torchrun (torch.distributed.run), one process per GPU, or N processes over gloo
on a CPU. Each job's processes live in a session of their own, die with the server (PR_SET_PDEATHSIG),
write their output to <job_dir>/worker/worker.log, and talk to the server through the files in
worker/channel.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import TrlPostTrainingConfig
from ..hardware import cuda_devices, training_device
from ..failures import describe_exit, root_cause
from ..worker import channel
from ..worker.channel import EventReader, JobSpec
from .base import Outcome, Report

log = logging.getLogger(__name__)

WORKER = "llama_stack_provider_trl.worker"
LAUNCHER = "llama_stack_provider_trl.worker.launch"
POLL_S = 0.1


class LocalExecutor:
    name = "local"

    def __init__(self, config: TrlPostTrainingConfig) -> None:
        self.config = config
        self.device = training_device(config.device)
        self.output_dir = config.resolved_output_dir()
        self._spare: subprocess.Popen | None = None

    def devices(self) -> list[str]:
        return cuda_devices() if self.device == "cuda" else ["cpu"]

    # ---- the warm spare -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Start the spare if there is none. Called from the scheduler's thread only: the spare dies
        with the thread that started it (PR_SET_PDEATHSIG), and that thread lives as long as the server."""
        if not self.config.warm_worker or self.config.processes_per_job != 1:
            return
        if self._spare is not None and self._spare.poll() is None:
            return
        with (self.output_dir / ".spare.log").open("ab") as out:
            self._spare = subprocess.Popen(
                [sys.executable, "-m", WORKER, "--standby"], stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, env=self._env(None),
            )

    def _take_spare(self, spec: JobSpec) -> subprocess.Popen | None:
        spare, self._spare = self._spare, None
        if spare is None or spare.poll() is not None:
            return None
        # CUDA_VISIBLE_DEVICES is read once, when CUDA starts: a spare sees every GPU, so it takes
        # only jobs that are given all of them (or run on the CPU)
        if self.device == "cuda" and spec.devices != self.devices():
            self._spare = spare
            return None
        try:
            spare.stdin.write(f"{JobSpec.path(Path(spec.job_dir))}\n".encode())
            spare.stdin.close()
        except (BrokenPipeError, OSError):
            return None
        return spare

    # ---- jobs -----------------------------------------------------------------------------------

    def start(self, spec: JobSpec) -> LocalJob:
        job_dir = Path(spec.job_dir)
        channel.reset(job_dir)
        spec_path = spec.write()
        log_path = channel.worker_dir(job_dir) / "worker.log"
        if spec.world_size == 1:
            spare = self._take_spare(spec)
            if spare is not None:
                return LocalJob(spare, spec, log_path)
            command = [sys.executable, "-m", WORKER, str(spec_path)]
        else:
            command = [sys.executable, "-m", LAUNCHER, "--standalone", f"--nproc-per-node={spec.world_size}",
                       "--module", WORKER, str(spec_path)]
        with log_path.open("ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=self._env(spec))
        return LocalJob(process, spec, log_path)

    def _env(self, spec: JobSpec | None) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if spec is None:
            return env
        if self.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.devices)
        elif spec.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # torchrun would set 1; share the cores out instead
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.world_size))
        return env

    def close(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            _kill_session(spare.pid)
            spare.wait(5)


class LocalJob:
    def __init__(self, process: subprocess.Popen, spec: JobSpec, log_path: Path) -> None:
        self.process = process
        self.spec = spec
        self.job_dir = Path(spec.job_dir)
        self.log_path = log_path
        self.silence_timeout = TrlPostTrainingConfig.model_validate(spec.config).worker_silence_timeout_s
        self._killed = False

    def processes(self) -> list[dict[str, Any]]:
        return channel.processes(self.job_dir)

    def stop(self) -> None:
        channel.request_stop(self.job_dir)

    def kill(self) -> None:
        self._killed = True
        # the ranks are in the launcher's session; each is also killed by pid, and dies with its launcher
        for proc in self.processes():
            if _is_our_worker(proc["pid"]):
                _kill(proc["pid"])
        _kill_session(self.process.pid)

    def wait(self, report: Report) -> Outcome:
        reader = EventReader(self.job_dir)
        end: dict[str, Any] | None = None
        errors: list[dict[str, Any]] = []
        known: list[dict[str, Any]] = []
        training, silenced = False, False
        last_event = time.monotonic()
        while True:
            exited = self.process.poll() is not None
            for event in reader.poll():
                last_event = time.monotonic()
                if event["type"] == "report":
                    phase = event["fields"].get("phase")
                    if phase is not None:
                        training = phase == "training"
                    report(event["persist"], event["fields"])
                elif event["type"] == "error":
                    errors.append(event)
                elif event["type"] == "end":
                    end = event
            if len(known) < self.spec.world_size:
                found = self.processes()
                if found != known:
                    known = found
                    report(True, {"resources_allocated": {"processes": known}})
            if exited:
                break
            if training and not silenced and time.monotonic() - last_event > self.silence_timeout:
                log.error("job %s: no report for %.0f s; killing its processes", self.spec.job_uuid, self.silence_timeout)
                silenced = True
                self.kill()
            time.sleep(POLL_S)
        return self._outcome(end, errors, silenced)

    def _outcome(self, end: dict[str, Any] | None, errors: list[dict[str, Any]], silenced: bool) -> Outcome:
        if end is not None and end["status"] == "completed":
            return Outcome("completed", checkpoints=end["checkpoints"])
        if end is not None and end["status"] == "interrupted":
            return Outcome("interrupted")
        if silenced:
            return Outcome("failed", error=f"no progress from the job's processes for {self.silence_timeout:.0f} s "
                                           "(the provider's worker_silence_timeout_s): a hung collective operation "
                                           "or a stuck rank; its processes were killed")
        if self._killed:
            return Outcome("killed")
        log_tail = self._log_tail()
        cause = root_cause(log_tail) if self.spec.world_size > 1 else None
        if cause is not None and cause[1] < 0:  # a rank died by a signal; the others' errors follow from it
            return Outcome("failed", error=describe_exit(self.process.returncode, log_tail))
        if errors:
            first = min(errors, key=lambda e: e["rank"])  # rank 0's view, where it has one
            prefix = f"rank {first['rank']}: " if self.spec.world_size > 1 else ""
            return Outcome("failed", error=prefix + first["message"])
        return Outcome("failed", error=describe_exit(self.process.returncode, log_tail))

    def _log_tail(self, size: int = 20000) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_our_worker(pid: int) -> bool:
    """A pid from a rank file names our worker, not a process that took the number since."""
    try:
        return WORKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
