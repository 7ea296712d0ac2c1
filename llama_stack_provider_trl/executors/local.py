"""Jobs in worker processes on this machine.

A one-process job is forked by the warm worker, a fork server that imported the training stack once
(`warm_worker`), so it starts in milliseconds and still exits after its job; without it, the job runs in
a fresh `python -m llama_stack_provider_trl.worker`. A job of several processes runs under torchrun
(torch.distributed.run), one process per GPU, or N processes over gloo on a CPU. Each job's processes
live in a session of their own, die with the server (PR_SET_PDEATHSIG), write their output to
<job_dir>/worker/worker.log, and talk to the server through the files in worker/channel.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
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
        self._forks: ForkServer | None = None

    def devices(self) -> list[str]:
        return cuda_devices() if self.device == "cuda" else ["cpu"]

    # ---- the warm worker ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Start the fork server if there is none. Called from the scheduler's thread only: it dies with
        the thread that started it (PR_SET_PDEATHSIG), and that thread lives as long as the server."""
        if not self.config.warm_worker or self.config.processes_per_job != 1:
            return
        if self._forks is None or not self._forks.alive():
            self._forks = ForkServer(self._env(None), self.output_dir / ".fork-server.log")

    # ---- jobs -----------------------------------------------------------------------------------

    def start(self, spec: JobSpec) -> LocalJob:
        job_dir = Path(spec.job_dir)
        channel.reset(job_dir)
        spec_path = spec.write()
        log_path = channel.worker_dir(job_dir) / "worker.log"
        if spec.world_size == 1:
            self.prepare()
            if self._forks is not None and self._forks.can_fork():
                pid = self._forks.fork(spec_path)
                if pid is not None:
                    return self._job(ForkedProcess(self._forks, pid), spec, log_path)
            command = [sys.executable, "-m", WORKER, str(spec_path)]
        else:
            command = [sys.executable, "-m", LAUNCHER, "--standalone", f"--nproc-per-node={spec.world_size}",
                       "--module", WORKER, str(spec_path)]
        with log_path.open("ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=self._env(spec))
        return self._job(process, spec, log_path)

    def _job(self, process: subprocess.Popen | ForkedProcess, spec: JobSpec, log_path: Path) -> LocalJob:
        return LocalJob(process, spec, log_path, self.config.worker_silence_timeout_s)

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
        forks, self._forks = self._forks, None
        if forks is not None:
            forks.close()


class ForkServer:
    """The warm worker (`worker --fork-server`): forks one process per job, reports their pids and exits."""

    START_TIMEOUT_S = 600  # its imports, on a busy machine

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        with log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", WORKER, "--fork-server"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, start_new_session=True, env=env)
        self._changed = threading.Condition()
        self._ready: bool | None = None  # None until it has imported; False if it cannot fork CUDA jobs
        self._started: dict[str, int] = {}
        self._exits: dict[int, int] = {}
        self._gone = False
        threading.Thread(target=self._read, name="trl-fork-server", daemon=True).start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            words = raw.decode(errors="replace").rstrip("\n").split(" ", 2)  # a spec path may hold spaces
            with self._changed:
                if words[:1] == ["ready"]:
                    self._ready = "cuda_initialized=0" in words
                elif words[:1] == ["started"] and len(words) == 3:
                    self._started[words[2]] = int(words[1])
                elif words[:1] == ["exit"] and len(words) == 3:
                    self._exits[int(words[1])] = int(words[2])
                self._changed.notify_all()
        with self._changed:
            self._gone = True
            self._changed.notify_all()

    def alive(self) -> bool:
        return self.process.poll() is None and not self._gone

    def can_fork(self) -> bool:
        """False only once it has said it cannot (CUDA started in it, so its children could not use CUDA)."""
        return self.alive() and self._ready is not False

    def fork(self, spec_path: Path) -> int | None:
        """The pid of a new process running the job, or None if the fork server is gone."""
        key = str(spec_path)
        try:
            self.process.stdin.write(f"{key}\n".encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        with self._changed:
            self._changed.wait_for(lambda: key in self._started or self._gone, timeout=self.START_TIMEOUT_S)
            return self._started.pop(key, None)

    def returncode(self, pid: int) -> int | None:
        with self._changed:
            if pid in self._exits:
                return self._exits.pop(pid)
            gone = self._gone
        if gone and not _exists(pid):
            return -signal.SIGKILL  # its parent died, and PR_SET_PDEATHSIG took it along
        return None

    def close(self) -> None:
        _kill_session(self.process.pid)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass


class ForkedProcess:
    """A job process forked by the fork server, seen like a Popen: pid, poll(), returncode."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.returncode(self.pid)
        return self.returncode


class LocalJob:
    def __init__(self, process: subprocess.Popen | ForkedProcess, spec: JobSpec, log_path: Path,
                 silence_timeout: float) -> None:
        self.process = process
        self.spec = spec
        self.job_dir = Path(spec.job_dir)
        self.log_path = log_path
        self.silence_timeout = silence_timeout
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
        if self.process.poll() is None:
            # a process forked a moment ago may not have its own session yet (setsid), so the killpg above
            # finds no group: a cancel right after the start would be lost and the job train on
            _kill(self.process.pid)

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


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_our_worker(pid: int) -> bool:
    """A pid from a rank file names our worker, not a process that took the number since."""
    try:
        return WORKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
