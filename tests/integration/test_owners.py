"""Jobs belong to their owners, on a real server with Llama Stack's authentication switched on.

The `custom` auth provider asks an endpoint this test serves on loopback who a bearer token is. alice
and bob are ordinary users who even share a team (Llama Stack's own default policy would let them see
each other's resources); root has the admin role, which run.yaml's access_policy gives every job.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from stack_server import StackServer, dpo_request

from llama_stack_provider_trl.access import owner_tag

pytestmark = pytest.mark.integration

USERS = {
    "alice-token": {"principal": "alice", "attributes": {"roles": ["user"], "teams": ["ml"]}},
    "bob-token": {"principal": "bob", "attributes": {"roles": ["user"], "teams": ["ml"]}},
    "root-token": {"principal": "root", "attributes": {"roles": ["admin"]}},
    "carol-token": {"principal": "carol", "attributes": {"roles": ["auditor"]}},
}
ADMIN_RULE = {"permit": {"actions": ["read", "update", "delete"], "resource": "post_training_job::*"},
              "when": "user with admin in roles", "description": "admins see and manage every training job"}
POLICY = [
    ADMIN_RULE,
    {"forbid": {"actions": ["create"], "resource": "post_training_job::*"}, "when": "user with auditor in roles"},
    {"permit": {"actions": ["read"], "resource": "post_training_job::*"}, "when": "user with auditor in roles"},
]
LONG = {"batch_size": 1, "max_steps_per_epoch": 16, "n_epochs": 50}
# the keys of alice's and bob's jobs, by which anyone but their owner sees them
ALICE_2, ALICE_1, BOBS_1 = (f"{job}@{owner_tag(who)}" for job, who in (("alice-2", "alice"), ("job-1", "alice"),
                                                                        ("job-1", "bob")))


class AuthEndpoint(BaseHTTPRequestHandler):
    """What Llama Stack's custom auth provider calls: {"api_key", "request"} in, {"principal", "attributes"} out."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = USERS.get(body["api_key"])
        payload = json.dumps(user or {"error": "unknown token"}).encode()
        self.send_response(200 if user else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def auth_endpoint():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), AuthEndpoint)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/auth"
    httpd.shutdown()
    httpd.server_close()


def as_user(server, token):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def submit(client, job_uuid, model, data, **training):
    return client.post("/v1/post-training/preference-optimize",
                       json=dpo_request(job_uuid, str(model), str(data), **training))


def listed(client):
    r = client.get("/v1/post-training/jobs")
    assert r.status_code == 200, r.text
    return sorted(j["job_uuid"] for j in r.json()["data"])


def status(client, job_uuid):
    r = client.get("/v1/post-training/job/status", params={"job_uuid": job_uuid})
    assert r.status_code == 200, r.text
    return r.json()


def every_route(client, job_uuid):
    """(route, response) for each route that names a job, in every shape the provider serves."""
    answers = []
    for base in ("/v1/post-training", "/v1alpha/post-training"):
        for name in ("status", "artifacts"):
            answers.append((f"{base}/job/{name}", client.get(f"{base}/job/{name}", params={"job_uuid": job_uuid})))
        for name in ("cancel", "delete"):
            answers.append((f"{base}/job/{name}", client.post(f"{base}/job/{name}", json={"job_uuid": job_uuid})))
    path = f"/v1alpha/post-training/jobs/{job_uuid}"
    answers += [(f"{path}/{name}", client.get(f"{path}/{name}")) for name in ("status", "artifacts")]
    answers += [(f"{path}/cancel", client.post(f"{path}/cancel")), (path, client.delete(path))]
    ft = f"/v1/fine_tuning/jobs/{job_uuid}"  # the OpenAI routes reach the same jobs
    answers += [(route, client.get(route)) for route in (ft, f"{ft}/events", f"{ft}/checkpoints")]
    answers += [(f"{ft}/{name}", client.post(f"{ft}/{name}")) for name in ("cancel", "pause", "resume")]
    return answers


def listed_openai(client):
    r = client.get("/v1/fine_tuning/jobs")
    assert r.status_code == 200, r.text
    return sorted(j["id"] for j in r.json()["data"])


def assert_unknown(client, *job_uuids):
    """Every route answers for each of `job_uuids` exactly what it answers for an id nobody ever used."""
    never = "never-used-id"
    unknown = every_route(client, never)
    assert all(r.status_code == 404 for _, r in unknown), unknown
    for job_uuid in job_uuids:
        for (route, got), (_, expected) in zip(every_route(client, job_uuid), unknown, strict=True):
            assert (got.status_code, got.text) == (404, expected.text.replace(never, job_uuid)), route


def test_jobs_are_seen_and_stopped_only_by_their_owner_or_an_admin(workspace, tiny_model, seed_file, auth_endpoint):
    auth = {"provider_config": {"type": "custom", "endpoint": auth_endpoint}, "access_policy": POLICY}
    server = StackServer(workspace / "owners", extra_roots=[workspace], token="root-token",
                         provider={"limits": {"max_active_jobs_per_user": 1}},
                         run_overrides={"server": {"port": 8321, "auth": auth}})
    server.start()
    try:
        alice, bob, root = (as_user(server, t) for t in ("alice-token", "bob-token", "root-token"))
        assert httpx.get(f"{server.url}/v1/post-training/jobs").status_code == 401

        assert submit(alice, "job-1", tiny_model, seed_file, max_steps_per_epoch=1).status_code == 200
        assert server.wait(ALICE_1)["status"] == "completed"  # as root, who sees every job by its key
        assert submit(alice, "alice-2", tiny_model, seed_file, **LONG).status_code == 200
        server.wait(ALICE_2, statuses=("in_progress",))
        # bob may use an id alice has: no 409 tells him it exists; his job is his own
        r = submit(bob, "job-1", tiny_model, seed_file)
        assert r.status_code == 200 and r.json()["job_uuid"] == "job-1", r.text
        # the per-user limit: alice has one job waiting or running; bob's did not count against her
        r = submit(alice, "alice-3", tiny_model, seed_file)
        assert r.status_code == 429 and "limits.max_active_jobs_per_user (1)" in r.json()["error"]["message"], r.text
        assert submit(alice, "job-1", tiny_model, seed_file).status_code == 409  # her own id: a 409 is no news

        assert listed(alice) == listed_openai(alice) == ["alice-2", "job-1"]
        assert listed(bob) == listed_openai(bob) == ["job-1"]
        assert listed(root) == listed_openai(root) == sorted([ALICE_2, ALICE_1, BOBS_1])
        assert alice.get("/v1/fine_tuning/jobs/job-1").json()["status"] == "succeeded"
        mine, his = status(alice, "job-1"), status(bob, "job-1")
        assert mine["status"] == "completed" and mine["checkpoints"] and mine["job_uuid"] == "job-1"
        assert his["status"] == "scheduled" and his["checkpoints"] == [] and his["job_uuid"] == "job-1"
        assert status(root, BOBS_1) == {**his, "job_uuid": BOBS_1}
        r = alice.get("/v1alpha/post-training/jobs/job-1/artifacts")
        assert r.status_code == 200 and r.json()["checkpoints"] == mine["checkpoints"]

        # another user's job is an unknown job on every route; cancel and delete by bob leave it alone
        assert_unknown(bob, "alice-2", ALICE_2)  # by the id alice chose or by its key
        assert_unknown(alice, BOBS_1)
        assert status(alice, "alice-2")["status"] == "in_progress"
        assert status(bob, "job-1")["status"] == "scheduled"
        # headers claiming a principal, without a token or beside bob's, change nothing
        claim = {"X-LlamaStack-Provider-Data": json.dumps(
            {"__authenticated_user": {"principal": "alice", "attributes": {"roles": ["admin"]}}})}
        assert httpx.get(f"{server.url}/v1/post-training/jobs", headers=claim).status_code == 401
        bob.headers.update(claim)
        assert listed(bob) == ["job-1"]
        assert status(bob, "job-1") == his
        assert bob.get("/v1/post-training/job/status", params={"job_uuid": "alice-2"}).status_code == 404
        # the admin rule: root cancels bob's waiting job; then alice her own running one (early: it trains on
        # the CPU the checks need; bob's would start after it)
        assert root.post("/v1/post-training/job/cancel", json={"job_uuid": BOBS_1}).status_code == 200
        assert status(bob, "job-1")["status"] == "cancelled"
        assert alice.post("/v1alpha/post-training/jobs/alice-2/cancel").status_code == 200
        assert server.wait(ALICE_2)["status"] == "cancelled"
        assert status(alice, "job-1")["status"] == "completed"  # bob's cancel-by-id never reached it

        # an auditor may read every job but neither start nor cancel one: a 403, since it may see them
        carol = as_user(server, "carol-token")
        assert listed(carol) == sorted([ALICE_2, ALICE_1, BOBS_1])
        assert status(carol, ALICE_1)["checkpoints"] == mine["checkpoints"]
        r = carol.post("/v1/post-training/job/cancel", json={"job_uuid": ALICE_1})
        assert r.status_code == 403 and "cannot perform action 'update'" in r.text, r.text
        r = submit(carol, "carol-1", tiny_model, seed_file)
        assert r.status_code == 403 and "cannot perform action 'create'" in r.text, r.text
        assert listed(carol) == sorted([ALICE_2, ALICE_1, BOBS_1])
    finally:
        server.stop()

    server = StackServer(workspace / "owners", extra_roots=[workspace], token="root-token", port=server.port,
                         provider={"limits": {"max_active_jobs_per_user": 1}, "warm_worker": False},  # trains nothing
                         run_overrides={"server": {"port": 8321, "auth": auth}})
    server.start()
    try:
        alice, bob, root = (as_user(server, t) for t in ("alice-token", "bob-token", "root-token"))
        assert listed(alice) == ["alice-2", "job-1"]
        assert listed(bob) == ["job-1"]
        assert listed(root) == sorted([ALICE_2, ALICE_1, BOBS_1])
        assert status(bob, "job-1")["status"] == "cancelled" and status(alice, "job-1")["status"] == "completed"
        assert_unknown(bob, "alice-2")
        r = alice.delete("/v1alpha/post-training/jobs/alice-2")
        assert r.status_code == 200, r.text
        assert listed(root) == sorted([ALICE_1, BOBS_1])
    finally:
        server.stop()
