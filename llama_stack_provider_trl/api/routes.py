"""FastAPI routes of the post_training API, in every shape clients in the wild call.

- ``/v1/post-training/...``: llama-stack-client 0.2.x and the original README;
- ``/v1alpha/post-training/...``: llama-stack-client 0.3 to 0.6 (``client.alpha.post_training``);
- ``/v1alpha/post-training/jobs/{job_uuid}/status|artifacts|cancel``: what Llama Stack 0.5/0.6 servers declared.

All of them call the same implementation. ``create_router`` is also called with
``impl=None`` (route inspection), so handlers look ``impl`` up only per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException  # what FastAPI raises for a body it cannot parse

from .models import (
    JOB_KEY_PATTERN,
    CancelTrainingJobRequest,
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
    PreferenceOptimizeRequest,
    SupervisedFineTuneRequest,
)
from .openai_routes import add_openai_routes
from .protocol import PostTraining

log = logging.getLogger(__name__)


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One line per problem, each naming the field by its dotted path."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        # pydantic puts union/discriminator tags into loc; they are not field names
        loc = [p for p in loc if not p.startswith(("function-", "tagged-union"))]
        msg = error.get("msg", "invalid value").removeprefix("Value error, ")
        field = ".".join(loc)
        parts.append(f"{field}: {msg}" if field and not msg.startswith(field) else msg)
    return "invalid request: " + "; ".join(parts)


class ReadableValidationRoute(APIRoute):
    """Answers every error itself, in Llama Stack's {"error": {"message": ...}} shape.

    Validation errors become a 400 whose message names the fields. Errors left to the
    server's catch-all Exception handler get answered but then re-raised by Starlette,
    which leaves keep-alive clients waiting, so they are translated here instead.
    """

    max_body_bytes: Callable[[], int | None] = staticmethod(lambda: None)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        max_body_bytes = self.max_body_bytes

        async def route_handler(request: Request) -> Response:
            limit = max_body_bytes()
            if limit is not None and request.method == "POST":
                refusal = await read_body_within(request, limit)
                if refusal is not None:
                    return refusal
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(400, describe_validation_errors(list(exc.errors())))
            except HTTPException as exc:
                if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
                    # FastAPI's own message ("error parsing the body") does not say what is wrong
                    return error_response(400, "invalid request: the JSON body is nested too deeply to parse")
                return error_response(exc.status_code, str(exc.detail))
            except Exception as exc:
                from llama_stack.core.exceptions.translation import translate_exception

                http = translate_exception(exc)
                if http.status_code >= 500:
                    log.exception("post_training request failed")
                return error_response(http.status_code, str(http.detail))

        return route_handler


async def read_body_within(request: Request, limit: int) -> Response | None:
    """Read the body only up to `limit` bytes: refuse on a larger Content-Length before reading any of
    it, and stop a chunked (or lying) body at the limit, so an oversized request never sits in memory.
    The body read is handed on to FastAPI, which takes request._body when it is there."""
    too_large = f"request body is larger than the provider's limits.max_request_bytes ({limit} bytes)"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return error_response(413, too_large)
        except ValueError:
            return error_response(400, f"invalid Content-Length header: {declared[:40]!r}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return error_response(413, too_large)
    request._body = bytes(body)
    return None


def error_response(status_code: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"error": {"message": message}})


JobUuidQuery = Annotated[str, Query(description="The job's UUID.", min_length=1, max_length=128)]
# a job_uuid, or the key another user's job with the same id is shown by to an admin (access.py)
JobUuidPath = Annotated[str, Path(description="The job's UUID.", pattern=JOB_KEY_PATTERN)]


def create_router(impl: PostTraining | None) -> APIRouter:
    class Route(ReadableValidationRoute):
        max_body_bytes = staticmethod(lambda: getattr(impl, "max_request_bytes", None))

    router = APIRouter(tags=["Post Training"], route_class=Route)

    def _impl() -> PostTraining:
        if impl is None:
            raise RuntimeError("post_training provider is not initialised")
        return impl

    async def preference_optimize(request: Annotated[PreferenceOptimizeRequest, Body()]) -> PostTrainingJob:
        return await _impl().preference_optimize(request)

    async def supervised_fine_tune(request: Annotated[SupervisedFineTuneRequest, Body()]) -> PostTrainingJob:
        return await _impl().supervised_fine_tune(request)

    async def get_training_jobs() -> ListPostTrainingJobsResponse:
        return await _impl().get_training_jobs()

    async def job_status(job_uuid: JobUuidQuery) -> PostTrainingJobStatusResponse:
        return await _impl().get_training_job_status(job_uuid)

    async def job_artifacts(job_uuid: JobUuidQuery) -> PostTrainingJobArtifactsResponse:
        return await _impl().get_training_job_artifacts(job_uuid)

    async def job_cancel(request: Annotated[CancelTrainingJobRequest, Body()]) -> None:
        await _impl().cancel_training_job(request.job_uuid)

    async def job_delete(request: Annotated[CancelTrainingJobRequest, Body()]) -> None:
        await _impl().delete_training_job(request.job_uuid)

    async def job_delete_by_path(job_uuid: JobUuidPath) -> None:
        await _impl().delete_training_job(job_uuid)

    async def job_status_by_path(job_uuid: JobUuidPath) -> PostTrainingJobStatusResponse:
        return await _impl().get_training_job_status(job_uuid)

    async def job_artifacts_by_path(job_uuid: JobUuidPath) -> PostTrainingJobArtifactsResponse:
        return await _impl().get_training_job_artifacts(job_uuid)

    async def job_cancel_by_path(job_uuid: JobUuidPath) -> None:
        await _impl().cancel_training_job(job_uuid)

    for version in ("v1", "v1alpha"):
        base = f"/{version}/post-training"
        router.add_api_route(f"{base}/preference-optimize", preference_optimize, methods=["POST"],
                             response_model=PostTrainingJob, summary="Run preference optimization (DPO) of a model.")
        router.add_api_route(f"{base}/supervised-fine-tune", supervised_fine_tune, methods=["POST"],
                             response_model=PostTrainingJob, summary="Run supervised fine-tuning of a model.")
        router.add_api_route(f"{base}/jobs", get_training_jobs, methods=["GET"],
                             response_model=ListPostTrainingJobsResponse, summary="List all training jobs.")
        router.add_api_route(f"{base}/job/status", job_status, methods=["GET"],
                             response_model=PostTrainingJobStatusResponse, summary="Get the status of a training job.")
        router.add_api_route(f"{base}/job/artifacts", job_artifacts, methods=["GET"],
                             response_model=PostTrainingJobArtifactsResponse, summary="Get a training job's checkpoints.")
        router.add_api_route(f"{base}/job/cancel", job_cancel, methods=["POST"], status_code=200,
                             summary="Cancel a training job.")
        router.add_api_route(f"{base}/job/delete", job_delete, methods=["POST"], status_code=200,
                             summary="Delete a finished training job: its record and every file it wrote.")

    base = "/v1alpha/post-training/jobs/{job_uuid}"
    router.add_api_route(f"{base}/status", job_status_by_path, methods=["GET"],
                         response_model=PostTrainingJobStatusResponse, summary="Get the status of a training job.")
    router.add_api_route(f"{base}/artifacts", job_artifacts_by_path, methods=["GET"],
                         response_model=PostTrainingJobArtifactsResponse, summary="Get a training job's checkpoints.")
    router.add_api_route(f"{base}/cancel", job_cancel_by_path, methods=["POST"], status_code=200,
                         summary="Cancel a training job.")
    router.add_api_route(base, job_delete_by_path, methods=["DELETE"], status_code=200,
                         summary="Delete a finished training job: its record and every file it wrote.")
    add_openai_routes(router, _impl)  # /v1/fine_tuning/jobs, on the same job table
    return router
