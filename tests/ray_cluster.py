"""Start and stop a real one-machine Ray cluster (a head node) for the ray executor's tests and bench."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from stack_server import free_port

RAY_BIN = str(Path(sys.executable).with_name("ray"))


class RayHead:
    """`ray start --head --block` on loopback with `cpus` CPUs, its state in a temporary directory of its own
    (not /tmp/ray). Its processes share the process group of the `ray start` command, which stop() ends,
    leaving nothing running."""

    def __init__(self, cpus: int = 2) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus = cpus
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> RayHead:
        command = [RAY_BIN, "start", "--head", "--num-cpus", str(self.cpus), "--port", str(self.port),
                   "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp), "--disable-usage-stats",
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
                   "--ray-client-server-port", str(free_port()), "--block"]
        self.process = subprocess.Popen(command, stdout=(self.temp / "start.log").open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, "RAY_TMPDIR": str(self.temp)})
        deadline = time.monotonic() + timeout
        while not self.node_active():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.temp / "start.log").read_text()
                self.stop()
                raise RuntimeError(f"the Ray head did not start:\n{log}")
            time.sleep(0.5)
        return self

    def node_active(self) -> bool:
        """The head's node has registered: `ray status` answers before that, and a driver connecting then
        waits for it."""
        status = subprocess.run([RAY_BIN, "status", "--address", self.address], capture_output=True, text=True)
        return status.returncode == 0 and "node_" in status.stdout

    def processes(self) -> list[psutil.Process]:
        found = []
        if self.process is None:
            return found
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self.process.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return found

    def stop(self) -> list[str]:
        """End every process of the cluster; returns the command lines of any still running after 10 s."""
        left: list[str] = []
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            for proc in self.processes():  # what outlived SIGTERM
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + 10
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [" ".join(p.cmdline()) for p in self.processes()]
        shutil.rmtree(self.temp, ignore_errors=True)
        return left
