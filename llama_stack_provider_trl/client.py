"""A typed post_training helper for llama-stack-client 0.7, which has no post_training resource.

    from llama_stack_client import LlamaStackClient
    from llama_stack_provider_trl.client import PostTrainingClient

    pt = PostTrainingClient(LlamaStackClient(base_url="http://localhost:8321"))
    job = pt.preference_optimize(job_uuid="dpo-1", finetuned_model="./models/tiny-llama",
                                 algorithm_config={"beta": 0.1}, training_config={"dataset": "dpo-demo"})
    status = pt.wait(job.job_uuid)

It goes through the client's generic post/get, so auth, retries and headers are the SDK's own. The response
models mirror api/models.py as llama_stack_client models (cast_to must subclass the SDK's BaseModel), so a client
machine needs the SDK only, not llama-stack.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from llama_stack_client import BaseModel, LlamaStackClient

BASE = "/v1/post-training"
FINAL = ("completed", "failed", "cancelled")


class PostTrainingJob(BaseModel):
    job_uuid: str


class ListPostTrainingJobsResponse(BaseModel):
    data: list[PostTrainingJob]


class Checkpoint(BaseModel):
    identifier: str
    created_at: datetime
    epoch: int
    post_training_job_id: str
    path: str
    training_metrics: dict[str, Any] | None = None
    kind: str | None = None


class PostTrainingJobStatusResponse(BaseModel):
    job_uuid: str
    status: str
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    resources_allocated: dict[str, Any] | None = None
    checkpoints: list[Checkpoint] = []
    progress: dict[str, Any] | None = None
    error: str | None = None
    warnings: list[str] = []
    attempts: int = 0


class PostTrainingJobArtifactsResponse(BaseModel):
    job_uuid: str
    checkpoints: list[Checkpoint] = []


class PostTrainingClient:
    def __init__(self, client: LlamaStackClient) -> None:
        self.client = client

    def preference_optimize(self, **request: Any) -> PostTrainingJob:
        return self.client.post(f"{BASE}/preference-optimize", body=request, cast_to=PostTrainingJob)

    def supervised_fine_tune(self, **request: Any) -> PostTrainingJob:
        return self.client.post(f"{BASE}/supervised-fine-tune", body=request, cast_to=PostTrainingJob)

    def jobs(self) -> ListPostTrainingJobsResponse:
        return self.client.get(f"{BASE}/jobs", cast_to=ListPostTrainingJobsResponse)

    def status(self, job_uuid: str) -> PostTrainingJobStatusResponse:
        return self.client.get(f"{BASE}/job/status", cast_to=PostTrainingJobStatusResponse,
                               options={"params": {"job_uuid": job_uuid}})

    def artifacts(self, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        return self.client.get(f"{BASE}/job/artifacts", cast_to=PostTrainingJobArtifactsResponse,
                               options={"params": {"job_uuid": job_uuid}})

    def cancel(self, job_uuid: str) -> None:
        self.client.post(f"{BASE}/job/cancel", body={"job_uuid": job_uuid}, cast_to=type(None))

    def delete(self, job_uuid: str) -> None:
        """A finished job's record and files; a 409 while it waits or runs."""
        self.client.post(f"{BASE}/job/delete", body={"job_uuid": job_uuid}, cast_to=type(None))

    def wait(self, job_uuid: str, timeout: float = 600, poll: float = 1.0) -> PostTrainingJobStatusResponse:
        """Poll until the job is completed, failed or cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_uuid)
            if status.status in FINAL or time.monotonic() > deadline:
                return status
            time.sleep(poll)
