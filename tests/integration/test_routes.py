"""Every route shape clients call, on one real server, over HTTP and with llama-stack-client."""

import httpx
import pytest
from llama_stack_client import APIStatusError, LlamaStackClient
from stack_server import dpo_request

from llama_stack_provider_trl.client import PostTrainingClient

pytestmark = pytest.mark.integration

EXPECTED_ROUTES = {
    *((m, f"/{v}/post-training/{p}") for v in ("v1", "v1alpha") for m, p in [
        ("POST", "preference-optimize"), ("POST", "supervised-fine-tune"), ("GET", "jobs"),
        ("GET", "job/status"), ("GET", "job/artifacts"), ("POST", "job/cancel")]),
    ("GET", "/v1alpha/post-training/jobs/{job_uuid}/status"),
    ("GET", "/v1alpha/post-training/jobs/{job_uuid}/artifacts"),
    ("POST", "/v1alpha/post-training/jobs/{job_uuid}/cancel"),
}


@pytest.fixture(scope="module")
def finished_job(server, tiny_model, seed_file):
    r = httpx.post(f"{server.url}/v1alpha/post-training/preference-optimize",
                   json=dpo_request("routes-1", str(tiny_model), str(seed_file)))
    assert r.status_code == 200, r.text
    return server.wait("routes-1")


def test_provider_and_routes_are_listed(server):
    providers = httpx.get(f"{server.url}/v1/providers").json()["data"]
    assert any(p["api"] == "post_training" and p["provider_type"] == "inline::trl" for p in providers)
    routes = httpx.get(f"{server.url}/v1/inspect/routes").json()["data"]
    served = {(method, r["route"]) for r in routes for method in (r.get("methods") or [r.get("method")])}
    assert EXPECTED_ROUTES <= served, EXPECTED_ROUTES - served


def test_openapi_and_docs_show_routes_with_models(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {path for _, path in EXPECTED_ROUTES} <= set(spec["paths"])
    for name in ("PreferenceOptimizeRequest", "DPOAlignmentConfig", "TrainingConfig", "DataConfig",
                 "OptimizerConfig", "EfficiencyConfig", "PostTrainingJob", "PostTrainingJobStatusResponse",
                 "PostTrainingJobArtifactsResponse", "Checkpoint", "SupervisedFineTuneRequest"):
        assert name in spec["components"]["schemas"], name
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_every_read_shape_answers_for_the_same_job(server, finished_job):
    assert finished_job["status"] == "completed"
    u = server.url
    shapes = [
        (f"{u}/v1/post-training/job/status", {"job_uuid": "routes-1"}),
        (f"{u}/v1alpha/post-training/job/status", {"job_uuid": "routes-1"}),
        (f"{u}/v1alpha/post-training/jobs/routes-1/status", None),
    ]
    for url, params in shapes:
        body = httpx.get(url, params=params).json()
        assert (body["job_uuid"], body["status"]) == ("routes-1", "completed"), url
    for url, params in [(f"{u}/v1/post-training/job/artifacts", {"job_uuid": "routes-1"}),
                        (f"{u}/v1alpha/post-training/job/artifacts", {"job_uuid": "routes-1"}),
                        (f"{u}/v1alpha/post-training/jobs/routes-1/artifacts", None)]:
        assert len(httpx.get(url, params=params).json()["checkpoints"]) == 1, url
    for version in ("v1", "v1alpha"):
        jobs = httpx.get(f"{u}/{version}/post-training/jobs").json()["data"]
        assert {"job_uuid": "routes-1"} in jobs


def test_unknown_job_is_404_on_every_shape(server):
    u = server.url
    for r in [httpx.get(f"{u}/v1/post-training/job/status", params={"job_uuid": "ghost"}),
              httpx.get(f"{u}/v1alpha/post-training/job/artifacts", params={"job_uuid": "ghost"}),
              httpx.get(f"{u}/v1alpha/post-training/jobs/ghost/status"),
              httpx.post(f"{u}/v1/post-training/job/cancel", json={"job_uuid": "ghost"}),
              httpx.post(f"{u}/v1alpha/post-training/jobs/ghost/cancel")]:
        assert r.status_code == 404, r.text
        assert "ghost" in r.json()["error"]["message"]


def test_cancelling_a_finished_job_is_a_conflict(server, finished_job):
    r = httpx.post(f"{server.url}/v1alpha/post-training/jobs/routes-1/cancel")
    assert r.status_code == 409 and "already completed" in r.json()["error"]["message"]
    assert server.status("routes-1")["status"] == "completed"


def test_llama_stack_client_drives_a_job(server, tiny_model, seed_file):
    client = LlamaStackClient(base_url=server.url)
    pt = PostTrainingClient(client)
    payload = dpo_request("sdk-1", str(tiny_model), str(seed_file))
    job = pt.preference_optimize(**payload)
    assert job.job_uuid == "sdk-1"
    status = pt.wait("sdk-1", timeout=120, poll=0.2)
    assert status.status == "completed", status
    assert status.progress["step"] == status.progress["total_steps"]
    assert pt.artifacts("sdk-1").checkpoints[0].path.endswith("sdk-1/final")
    assert "sdk-1" in {j.job_uuid for j in pt.jobs().data}
    with pytest.raises(APIStatusError) as info:
        pt.status("nobody")
    assert info.value.status_code == 404
    # and the SDK's bare generic calls, as the README shows them
    raw = client.get("/v1/post-training/job/status", cast_to=object, options={"params": {"job_uuid": "sdk-1"}})
    assert raw["status"] == "completed"
    assert status.attempts == 1
    pt.delete("sdk-1")
    with pytest.raises(APIStatusError) as info:
        pt.status("sdk-1")
    assert info.value.status_code == 404


def test_supervised_fine_tune_routes_exist_on_both_versions(server):
    for version in ("v1", "v1alpha"):
        r = httpx.post(f"{server.url}/{version}/post-training/supervised-fine-tune", json={"job_uuid": "x"})
        assert r.status_code == 400 and "training_config" in r.json()["error"]["message"]
