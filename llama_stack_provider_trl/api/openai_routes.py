"""FastAPI routes of OpenAI's fine-tuning API, as the official ``openai`` SDK calls them
(``client.fine_tuning.jobs``, base_url ``http://host:port/v1``). Added to the post_training router by
create_router, so they share its error shape and its 400s that name the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request

from .models import JOB_KEY_PATTERN
from .openai_models import (
    CreateFineTuningJobRequest,
    FineTuningJob,
    Page,
    check_metadata,
)

JobId = Annotated[str, Path(description="The fine-tuning job's id.", pattern=JOB_KEY_PATTERN)]
After = Annotated[str | None, Query(description="The id of the last item of the previous page.", max_length=300)]
Limit = Annotated[int, Query(description="Items per page.", ge=1, le=1000)]


def metadata_filter(request: Request) -> dict[str, str]:
    """The SDK sends list(metadata={"k": "v"}) as metadata[k]=v."""
    found = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
             if key.startswith("metadata[") and key.endswith("]")}
    try:
        check_metadata(found)
    except ValueError as exc:
        raise ValueError(f"metadata: {exc}") from None
    return found


def add_openai_routes(router: APIRouter, impl: Callable[[], Any]) -> None:
    def ft():
        return impl().fine_tuning

    async def create(request: Annotated[CreateFineTuningJobRequest, Body()]) -> FineTuningJob:
        return await ft().create(request)

    async def list_jobs(request: Request, after: After = None, limit: Limit = 20) -> Page:
        return await ft().list(after, limit, metadata_filter(request))

    async def retrieve(fine_tuning_job_id: JobId) -> FineTuningJob:
        return await ft().retrieve(fine_tuning_job_id)

    async def cancel(fine_tuning_job_id: JobId) -> FineTuningJob:
        return await ft().cancel(fine_tuning_job_id)

    async def pause(fine_tuning_job_id: JobId) -> FineTuningJob:
        return await ft().pause(fine_tuning_job_id)

    async def resume(fine_tuning_job_id: JobId) -> FineTuningJob:
        return await ft().resume(fine_tuning_job_id)

    async def list_events(fine_tuning_job_id: JobId, after: After = None, limit: Limit = 20) -> Page:
        return await ft().list_events(fine_tuning_job_id, after, limit)

    async def list_checkpoints(fine_tuning_job_id: JobId, after: After = None, limit: Limit = 10) -> Page:
        return await ft().list_checkpoints(fine_tuning_job_id, after, limit)

    base = "/v1/fine_tuning/jobs"
    job = base + "/{fine_tuning_job_id}"
    tags = ["Fine Tuning (OpenAI)"]
    router.add_api_route(base, create, methods=["POST"], response_model=FineTuningJob, tags=tags,
                         summary="Create a fine-tuning job (supervised or DPO) from a training file.")
    router.add_api_route(base, list_jobs, methods=["GET"], response_model=Page, tags=tags,
                         summary="List fine-tuning jobs, newest first.")
    router.add_api_route(job, retrieve, methods=["GET"], response_model=FineTuningJob, tags=tags,
                         summary="Get a fine-tuning job.")
    router.add_api_route(job + "/cancel", cancel, methods=["POST"], response_model=FineTuningJob, tags=tags,
                         summary="Cancel a fine-tuning job.")
    router.add_api_route(job + "/pause", pause, methods=["POST"], response_model=FineTuningJob, tags=tags,
                         summary="Pause a job: it stops at a resumable checkpoint and frees its device.")
    router.add_api_route(job + "/resume", resume, methods=["POST"], response_model=FineTuningJob, tags=tags,
                         summary="Queue a paused job again; it continues from its checkpoint.")
    router.add_api_route(job + "/events", list_events, methods=["GET"], response_model=Page, tags=tags,
                         summary="A job's events, newest first.")
    router.add_api_route(job + "/checkpoints", list_checkpoints, methods=["GET"], response_model=Page, tags=tags,
                         summary="A job's checkpoints, newest first.")


__all__ = ["add_openai_routes"]
