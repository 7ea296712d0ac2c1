"""What one of a job's processes does: read the job's spec, run the method's recipe, report the end.

    python -m llama_stack_provider_trl.worker SPEC       one process, or each rank under torchrun
    python -m llama_stack_provider_trl.worker --standby  the warm spare: import the training stack,
                                                         then read the spec's path from stdin

torchrun owns the processes (RANK, WORLD_SIZE, the rendezvous); this file owns what a rank does.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import traceback
from pathlib import Path

from ..failures import describe_exception
from .channel import EventWriter, JobSpec

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
    """The spare was started before its job existed: from here on its output goes to the job's log."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    if argv == ["--standby"]:
        for module in RECIPES.values():
            importlib.import_module(module)  # the seconds a warm start saves
        line = sys.stdin.readline().strip()
        if not line:
            return 0  # the server closed us unused
        spec = JobSpec.read(Path(line))
        redirect_output(Path(spec.job_dir) / "worker" / "worker.log")
    elif len(argv) == 1:
        spec = JobSpec.read(Path(argv[0]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return run(spec)


def run(spec: JobSpec) -> int:
    rank = int(os.environ.get("RANK", "0"))
    job_dir = Path(spec.job_dir)
    events = EventWriter(job_dir, rank)
    events.register()
    try:
        from ..config import TrlPostTrainingConfig
        from ..plan import TrainingPlan
        from ..recipes.context import JobContext, JobInterrupted, latest_checkpoint

        ctx = JobContext(
            job_uuid=spec.job_uuid, job_dir=job_dir, method=spec.method, request=spec.request,
            config=TrlPostTrainingConfig.model_validate(spec.config), plan=TrainingPlan(**spec.plan),
            report=events.report, rank=rank, world_size=spec.world_size,
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
