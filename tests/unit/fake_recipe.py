"""A stand-in recipe for unit tests of the scheduler's own logic (no training)."""

import time

import torch

from llama_stack_provider_trl.api.models import Checkpoint
from llama_stack_provider_trl.jobs import now
from llama_stack_provider_trl.recipes.context import JobCancelled, JobInterrupted

RAN: list[str] = []


def train(ctx):
    RAN.append(ctx.job_uuid)
    behaviour = ctx.request.get("behaviour", "ok")
    if behaviour == "fail":
        raise RuntimeError("model directory unreadable")
    if behaviour == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if behaviour == "disk":
        raise OSError(28, "No space left on device")
    if behaviour == "busy_prepare":
        # like tokenizing a large dataset: Python code that never looks at cancel or shutdown
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sum(range(1000))
        raise AssertionError("preparation was not interrupted")
    if behaviour == "slow_save":
        ctx.training_begins()
        ctx.report(persist=True, phase="saving")
        (ctx.job_dir / "final").mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 10
        while not ctx.cancel_requested.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    if behaviour == "wait":
        for step in range(1, 500):
            ctx.report(persist=False, step=step)
            if ctx.cancel_requested.is_set():
                raise JobCancelled()
            if ctx.shutdown_requested.is_set():
                raise JobInterrupted()
            time.sleep(0.01)
    return [Checkpoint(identifier=f"{ctx.job_uuid}/final", created_at=now(), epoch=1,
                       post_training_job_id=ctx.job_uuid, path=str(ctx.job_dir / "final"))]
