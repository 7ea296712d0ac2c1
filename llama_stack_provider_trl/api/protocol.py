"""The post_training API as a Protocol: what any provider of it implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .models import (
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    PreferenceOptimizeRequest,
    SupervisedFineTuneRequest,
)


@runtime_checkable
class PostTraining(Protocol):
    async def preference_optimize(self, request: PreferenceOptimizeRequest) -> PostTrainingJob:
        """Schedule a DPO job; answers once the request is validated and stored."""
        ...

    async def supervised_fine_tune(self, request: SupervisedFineTuneRequest) -> PostTrainingJob:
        """Schedule a supervised fine-tuning job (full or LoRA)."""
        ...

    async def get_training_jobs(self) -> ListPostTrainingJobsResponse: ...

    async def get_training_job_status(self, job_uuid: str) -> PostTrainingJobStatusResponse: ...

    async def cancel_training_job(self, job_uuid: str) -> None: ...

    async def delete_training_job(self, job_uuid: str) -> None:
        """Delete a finished (completed, failed or cancelled) job's record and files; 409 while it runs."""
        ...

    async def get_training_job_artifacts(self, job_uuid: str) -> PostTrainingJobArtifactsResponse: ...
