"""What one of a job's processes does: read the job's spec, run the method's recipe, report the end.

    python -m llama_stack_provider_trl.worker SPEC           one process, or each rank under torchrun
    python -m llama_stack_provider_trl.worker --fork-server  the warm worker: import the training stack once,
                                                             then fork a fresh process for each spec path read
                                                             from stdin ("started PID SPEC" and "exit PID CODE"
                                                             on stdout)

torchrun owns the processes (RANK, WORLD_SIZE, the rendezvous); this file owns what a rank does. A forked
job process starts in milliseconds with everything imported, and exits after its job, so its memory goes
back to the system; the fork server itself never trains, and never starts CUDA, so its children can.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import select
import signal
import sys
import traceback
from pathlib import Path

from ..failures import describe_exception
from .channel import EventWriter, JobSpec, stop_requested

RECIPES = {"dpo": "llama_stack_provider_trl.recipes.dpo", "sft": "llama_stack_provider_trl.recipes.sft"}


def die_with_parent() -> None:
    """A worker outlives neither the server nor its launcher: if the parent dies (SIGKILL, the OOM killer),
    the kernel kills this process too, so no orphan keeps training beside a restarted server."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return  # not Linux: the server's shutdown still stops its workers
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def redirect_output(log: Path) -> None:
    """A forked job process inherits the fork server's output: from here on it goes to the job's log."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    if argv == ["--fork-server"]:
        return fork_server()
    if len(argv) == 1:
        return run(JobSpec.read(Path(argv[0])))
    print(__doc__, file=sys.stderr)
    return 2


def fork_server() -> int:
    """One thread only (forking a process with other threads can leave their locks held in the child):
    read spec paths, fork, and reap children, in one loop."""
    for module in RECIPES.values():
        importlib.import_module(module)  # the seconds each job saves
    import torch

    say(f"ready cuda_initialized={int(torch.cuda.is_initialized())}")
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.2)
        if readable:
            chunk = os.read(0, 4096)
            if not chunk:
                return 0  # the server is gone or closed us; our children die with us
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                spec_path = line.decode().strip()
                if spec_path:
                    say(f"started {fork_job(spec_path)} {spec_path}")
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def fork_job(spec_path: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()  # a session of its own: the server kills the job's process group, not the fork server
        die_with_parent()
        spec = JobSpec.read(Path(spec_path))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        redirect_output(Path(spec.job_dir) / "worker" / "worker.log")
        if spec.devices != ["cpu"]:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec.devices)  # read when CUDA starts, in this process
        code = run(spec)
    except BaseException:  # noqa: BLE001 - whatever happens, this process must not return into the loop above
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(spec: JobSpec, address: str | None = None) -> int:
    """One rank of the job (RANK from the launcher: torchrun, or Ray Train); `address`: its cluster node's."""
    rank = int(os.environ.get("RANK", "0"))
    job_dir = Path(spec.job_dir)
    events = EventWriter(job_dir, rank)
    events.register(address)
    try:
        from ..config import TrlPostTrainingConfig
        from ..plan import TrainingPlan
        from ..recipes.context import JobContext, JobInterrupted, latest_checkpoint

        ctx = JobContext(
            job_uuid=spec.job_uuid, job_dir=job_dir, method=spec.method, request=spec.request,
            config=TrlPostTrainingConfig.model_validate(spec.config), plan=TrainingPlan(**spec.plan),
            report=events.report, stop_requested=lambda: stop_requested(job_dir), rank=rank,
            world_size=spec.world_size,
        )
        ctx.resume_from = latest_checkpoint(ctx.checkpoints_dir)
        if ctx.resume_from is not None:
            step = int(ctx.resume_from.name.rsplit("-", 1)[1])
            events.report(persist=True, resumed_from_step=step, warnings=[f"resumed from the checkpoint at step {step}"])
        recipe = importlib.import_module(RECIPES[spec.method])
        checkpoints = recipe.train(ctx)
    except JobInterrupted:
        events.end("interrupted")
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which fails the job with it
        traceback.print_exc()
        events.error(describe_exception(exc))
        return 1
    events.end("completed", [c.model_dump(mode="json") for c in checkpoints])
    return 0
