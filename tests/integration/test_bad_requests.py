"""A battery of malformed and hostile requests against a real server.

Each gets its 4xx with a message naming the problem, before any work starts;
afterwards the job that was there before, and its artifacts, are untouched,
no directory was created for a refused job, and the server still trains.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from stack_server import StackServer, dpo_request

pytestmark = pytest.mark.integration

LIMITS = {"max_request_bytes": 65536, "max_dataset_rows": 50, "max_seq_length": 4096, "max_total_steps": 1000}


@pytest.fixture(scope="module")
def env(workspace, tiny_model, seed_file, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")  # not under any root
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text("{}")
    (outside / "data.json").write_text(seed_file.read_text())
    root = workspace / "battery"
    root.mkdir()
    (root / "model-link").symlink_to(outside / "model")
    (root / "data-link.json").symlink_to(outside / "data.json")
    (root / "csv-link.csv").symlink_to(outside / "secret.csv")
    (root / "empty-model").mkdir()
    (root / "empty.json").write_text(json.dumps({"data": []}))
    (root / "notes.txt").write_text("hello")
    rows = json.loads(seed_file.read_text())["data"]
    (root / "too-many.jsonl").write_text("".join(json.dumps(rows[0]) + "\n" for _ in range(60)))
    (root / "missing-field.json").write_text(json.dumps([rows[0], rows[1], {"prompt": "p", "chosen": "c"}]))
    (root / "not-string.json").write_text(json.dumps([{"prompt": "p", "chosen": 5, "rejected": "r"}]))
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "surrogate.jsonl").write_text('{"prompt": "p", "chosen": "c \\ud800", "rejected": "r"}\n')
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    (root / "no-shared-prompt.json").write_text(json.dumps([
        {"chosen": [turn("user", "Q?"), turn("assistant", "A")], "rejected": [turn("user", "Q?"), turn("assistant", "B")]},
        {"chosen": [turn("user", "Q?"), turn("assistant", "A")], "rejected": [turn("user", "R?"), turn("assistant", "B")]},
    ]))
    # model directories whose model.safetensors is broken or not a file at all
    broken = {"st-short": lambda p: p.write_bytes(b"abcd"),
              "st-huge": lambda p: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"),
              "st-dir": lambda p: p.mkdir(),
              "st-fifo": lambda p: os.mkfifo(p)}  # opening it for reading would block until a writer came
    for name, make in broken.items():
        (root / name).mkdir()
        shutil.copy(tiny_model / "config.json", root / name / "config.json")
        make(root / name / "model.safetensors")
    # a CSV outside every root, whose column names must never appear in a response
    (outside / "secret.csv").write_text("secret_column_a,secret_column_b\n1,2\n")

    server = StackServer(root / "server", provider={"limits": LIMITS}, extra_roots=[root, workspace]).start()
    for dataset_id, uri in (("outside-path", str(outside / "secret.csv")),
                            ("outside-file-uri", f"file://{outside / 'secret.csv'}"),
                            ("outside-via-link", str(root / "csv-link.csv"))):
        r = httpx.post(f"{server.url}/v1beta/datasets", json={
            "dataset_id": dataset_id, "purpose": "eval/question-answer", "source": {"type": "uri", "uri": uri}})
        assert r.status_code == 200, r.text
    keeper = httpx.post(f"{server.url}/v1/post-training/preference-optimize",
                        json=dpo_request("keeper", str(tiny_model), str(seed_file)))
    assert keeper.status_code == 200, keeper.text
    assert server.wait("keeper")["status"] == "completed"
    yield {"server": server, "root": root, "outside": outside, "model": str(tiny_model), "data": str(seed_file)}
    server.stop()


def ok_request(env, **changes):
    request = dpo_request("fresh", env["model"], env["data"])
    for dotted, value in changes.items():
        target = request
        *path, last = dotted.split(".")
        for key in path:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return request


DELETE = object()
PO = "/v1/post-training/preference-optimize"
SFT = "/v1/post-training/supervised-fine-tune"
LORA = {"lora_attn_modules": ["q_proj"]}


def sft_request(env, dataset):
    return {"job_uuid": "fresh-sft", "model": env["model"], "training_config": {"dataset": dataset}}


def nested_body(depth: int) -> bytes:
    return b'{"job_uuid": "deep", "logger_config": {"x": ' + b"[" * depth + b"]" * depth + b"}}"

# (name, path, payload builder or raw bytes, expected status, expected text in the message)
CASES = [
    ("uuid traversal", PO, lambda e: ok_request(e, job_uuid="../etc"), 400, "job_uuid"),
    ("uuid slash", PO, lambda e: ok_request(e, job_uuid="a/b"), 400, "job_uuid"),
    ("uuid too long", PO, lambda e: ok_request(e, job_uuid="x" * 200), 400, "job_uuid"),
    ("uuid empty", PO, lambda e: ok_request(e, job_uuid=""), 400, "job_uuid"),
    ("uuid wrong type", PO, lambda e: ok_request(e, job_uuid=5), 400, "job_uuid"),
    ("no model", PO, lambda e: ok_request(e, finetuned_model=DELETE), 400, "finetuned_model: Field required"),
    ("no training_config", PO, lambda e: ok_request(e, training_config=DELETE), 400, "training_config: Field required"),
    ("no algorithm_config", PO, lambda e: ok_request(e, algorithm_config=DELETE), 400, "algorithm_config: Field required"),
    ("negative epochs", PO, lambda e: ok_request(e, **{"training_config.n_epochs": -1}), 400, "training_config.n_epochs"),
    ("epochs as text", PO, lambda e: ok_request(e, **{"training_config.n_epochs": "one"}), 400, "training_config.n_epochs"),
    ("batch 0", PO, lambda e: ok_request(e, **{"training_config.batch_size": 0}), 400, "data_config.batch_size"),
    ("absurd batch", PO, lambda e: ok_request(e, **{"training_config.batch_size": 10**9}), 400, "data_config.batch_size"),
    ("negative lr", PO, lambda e: ok_request(e, **{"training_config.learning_rate": -1}), 400, "optimizer_config.lr"),
    ("absurd lr", PO, lambda e: ok_request(e, **{"training_config.learning_rate": 1e9}), 400, "optimizer_config.lr"),
    ("negative beta", PO, lambda e: ok_request(e, **{"algorithm_config.beta": -0.5}), 400, "algorithm_config.beta"),
    ("unknown loss", PO, lambda e: ok_request(e, **{"algorithm_config.loss_type": "magic"}), 400, "algorithm_config.loss_type"),
    ("kto_pair", PO, lambda e: ok_request(e, **{"algorithm_config.loss_type": "kto_pair"}), 400, "kto_pair"),
    ("unknown field", PO, lambda e: ok_request(e, surprise=1), 400, "surprise: Extra inputs are not permitted"),
    ("unknown nested field", PO, lambda e: ok_request(e, **{"training_config.epochs": 2}), 400, "training_config.epochs"),
    ("two learning rates", PO, lambda e: ok_request(e, **{"training_config.optimizer_config": {"lr": 0.1}}), 400, "contradicts"),
    ("bad dtype", PO, lambda e: ok_request(e, **{"training_config.dtype": "fp8"}), 400, "training_config.dtype"),
    ("zero accumulation", PO, lambda e: ok_request(e, **{"training_config.gradient_accumulation_steps": 0}), 400,
     "gradient_accumulation_steps"),
    ("seq length over limit", PO, lambda e: ok_request(e, **{"training_config.max_seq_length": 10**6}), 400,
     "above the provider's limit"),
    ("steps over limit", PO, lambda e: ok_request(e, **{"training_config.n_epochs": 1000}), 400, "max_total_steps"),
    ("model outside roots", PO, lambda e: ok_request(e, finetuned_model="/etc"), 403, "outside the allowed roots"),
    ("model traversal", PO, lambda e: ok_request(e, finetuned_model=f"{e['root']}/../../../../etc"), 403,
     "outside the allowed roots"),
    ("model symlink out", PO, lambda e: ok_request(e, finetuned_model=f"{e['root']}/model-link"), 403,
     "outside the allowed roots"),
    ("model missing", PO, lambda e: ok_request(e, finetuned_model=f"{e['root']}/nope"), 400, "no model directory"),
    ("model not HF", PO, lambda e: ok_request(e, finetuned_model=f"{e['root']}/empty-model"), 400, "no config.json"),
    ("model not an id", PO, lambda e: ok_request(e, finetuned_model="not a model!"), 400, "neither a local model"),
    ("data outside roots", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['outside']}/data.json"}),
     403, "outside the allowed roots"),
    ("data symlink out", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/data-link.json"}),
     403, "outside the allowed roots"),
    ("data unknown id", PO, lambda e: ok_request(e, **{"training_config.dataset": "never-registered"}), 400,
     "could not be read"),
    ("data empty", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/empty.json"}), 400, "no rows"),
    ("data not json", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/notes.txt"}), 400,
     "must be .json or .jsonl"),
    ("data too many rows", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/too-many.jsonl"}),
     400, "more than 50 rows"),
    ("row missing field", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/missing-field.json"}),
     400, "row 2: missing field 'rejected'"),
    ("row not string", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/not-string.json"}),
     400, "row 0: field 'chosen' must be a string"),
    ("lora unknown module", PO, lambda e: ok_request(e, **{"algorithm_config.lora": {"lora_attn_modules": ["wq"]}}),
     400, "q_proj"),
    ("data nested 100000 deep", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/deep.json"}),
     400, "deep.json row 0 is nested too deeply"),
    ("row lone surrogate", PO, lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/surrogate.jsonl"}),
     400, "row 0: field 'chosen' has an unpaired surrogate"),
    ("row without shared prompt", PO,
     lambda e: ok_request(e, **{"training_config.dataset": f"{e['root']}/no-shared-prompt.json"}), 400,
     "row 1: has no field 'prompt', and 'chosen' and 'rejected' do not begin with the same message"),
    ("lora 4-byte safetensors", PO,
     lambda e: ok_request(e, finetuned_model=f"{e['root']}/st-short", **{"algorithm_config.lora": LORA}), 400,
     "model.safetensors is 4 bytes, too short"),
    ("lora 2^62 header", PO,
     lambda e: ok_request(e, finetuned_model=f"{e['root']}/st-huge", **{"algorithm_config.lora": LORA}), 400,
     "declares a 4611686018427387904-byte header"),
    ("lora safetensors directory", PO,
     lambda e: ok_request(e, finetuned_model=f"{e['root']}/st-dir", **{"algorithm_config.lora": LORA}), 400,
     "model.safetensors is a directory"),
    ("lora safetensors fifo", PO,
     lambda e: ok_request(e, finetuned_model=f"{e['root']}/st-fifo", **{"algorithm_config.lora": LORA}), 400,
     "model.safetensors' is a FIFO, socket or device"),
    ("model with a fifo", PO, lambda e: ok_request(e, finetuned_model=f"{e['root']}/st-fifo"), 400,
     "st-fifo/model.safetensors' is a FIFO, socket or device"),
    ("registered outside path dpo", PO, lambda e: ok_request(e, **{"training_config.dataset": "outside-path"}), 403,
     "outside the allowed roots"),
    ("registered outside path sft", SFT, lambda e: sft_request(e, "outside-path"), 403, "outside the allowed roots"),
    ("registered outside file uri", SFT, lambda e: sft_request(e, "outside-file-uri"), 403, "outside the allowed roots"),
    ("registered symlink out", SFT, lambda e: sft_request(e, "outside-via-link"), 403, "outside the allowed roots"),
    ("body nested 20000 deep", PO, nested_body(20_000), 400, "nested too deeply"),
    ("duplicate uuid", PO, lambda e: ok_request(e, job_uuid="keeper"), 409, "already exists"),
    ("oversized body", PO, lambda e: ok_request(e, logger_config={"pad": "x" * 100_000}), 413, "max_request_bytes"),
    ("not json", PO, b"{this is not json", 400, "invalid request"),
    ("json array", PO, b"[1, 2]", 400, "invalid request"),
    ("cancel without uuid", "/v1/post-training/job/cancel", lambda e: {}, 400, "job_uuid: Field required"),
    ("sft without model", "/v1/post-training/supervised-fine-tune",
     lambda e: {"job_uuid": "s1", "training_config": {"dataset": e["data"]}}, 400, "model: required"),
    ("sft qlora on cpu", "/v1/post-training/supervised-fine-tune",
     lambda e: {"job_uuid": "s2", "model": e["model"], "training_config": {"dataset": e["data"]},
                "algorithm_config": {"type": "LoRA", "quantize_base": True}}, 400, "quantize_base"),
]


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_battery(env):
    server = env["server"]
    before_status = server.status("keeper")
    final_dir = Path(before_status["checkpoints"][0]["path"])
    before_files = digest(final_dir)
    dirs_before = sorted(p.name for p in server.output_dir.iterdir())

    failures = []
    with server.client() as client:
        for name, path, build, expected_status, expected_text in CASES:
            if isinstance(build, bytes):
                r = client.post(path, content=build, headers={"Content-Type": "application/json"})
            else:
                r = client.post(path, json=build(env))
            message = r.json().get("error", {}).get("message", "") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
            if r.status_code != expected_status or expected_text not in message:
                failures.append(f"{name}: got {r.status_code} {message!r}")
            if "secret_column" in r.text:  # nothing read from a file outside the roots is ever shown
                failures.append(f"{name}: the response shows an outside file's contents: {r.text!r}")
        # status with no job_uuid: a query-parameter error, named
        r = client.get("/v1/post-training/job/status")
        if r.status_code != 400 or "job_uuid" not in r.json()["error"]["message"]:
            failures.append(f"status without uuid: {r.status_code} {r.text}")

    assert not failures, "\n".join(failures)
    assert len(CASES) >= 30
    assert server.status("keeper") == before_status
    assert digest(final_dir) == before_files
    assert sorted(p.name for p in server.output_dir.iterdir()) == dirs_before  # no job dir for refused jobs
    ids = {j["job_uuid"] for j in httpx.get(f"{server.url}/v1/post-training/jobs").json()["data"]}
    assert ids == {"keeper"}


def test_server_still_trains_after_the_battery(env):
    server = env["server"]
    r = httpx.post(f"{server.url}{PO}", json=dpo_request("after-battery", env["model"], env["data"]))
    assert r.status_code == 200, r.text
    assert server.wait("after-battery")["status"] == "completed"
