"""The server keeps answering while a big dataset is read and checked, and never takes an
oversized body into memory. A real server; the bounds on time are generous, there only to tell
"answers" from "hangs"."""

import json
import select
import socket
import subprocess
import threading
import time

import httpx
import pytest
from stack_server import StackServer, dpo_request

pytestmark = pytest.mark.integration

BIG_ROWS = 300_000


def test_health_and_status_answer_while_a_big_dataset_is_checked(server, workspace, tiny_model):
    # valid rows, then one without 'rejected': the whole file is read and checked before the 400
    path = workspace / "big" / "big.jsonl"
    path.parent.mkdir(exist_ok=True)
    row = json.dumps({"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."}) + "\n"
    path.write_text(row * BIG_ROWS + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")

    done = threading.Event()
    latencies: list[tuple[str, float]] = []
    errors: list[str] = []

    def poll():
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while not done.is_set():
                for route in ("/v1/health", "/v1/post-training/jobs", "/v1/post-training/job/status?job_uuid=big"):
                    start = time.monotonic()
                    try:
                        client.get(route)
                    except httpx.HTTPError as exc:
                        errors.append(f"{route}: {exc!r}")
                    latencies.append((route, time.monotonic() - start))
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", timeout=120,
                       json=dpo_request("big", str(tiny_model), str(path)))
    finally:
        done.set()
        poller.join()
    assert r.status_code == 400, r.text
    assert f"row {BIG_ROWS}: missing field 'rejected'" in r.json()["error"]["message"]
    assert not errors, errors
    slowest = max(latencies, key=lambda item: item[1])
    assert slowest[1] < 2.0, f"a route waited {slowest[1]:.1f}s while the dataset was checked: {slowest[0]}"
    assert len(latencies) >= 6  # the polls overlapped the check


def send_until_answered(server, head: bytes, chunks, budget: int) -> tuple[bytes, int]:
    """Send head, then chunks, until the server answers or `budget` bytes have gone; (answer, bytes sent)."""
    host, port = server.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        for chunk in chunks:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable or sent >= budget:
                break
            if writable:
                try:
                    sent += sock.send(chunk)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    break
        sock.setblocking(True)
        sock.settimeout(30)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


def limit_of(server) -> int:
    return server.provider_config().get("limits", {}).get("max_request_bytes", 8 * 1024 * 1024)


def rss_kib(server) -> int:
    status = open(f"/proc/{server.process.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_a_large_content_length_is_refused_before_the_body_is_read(server):
    rss_before = rss_kib(server)
    head = (b"POST /v1/post-training/preference-optimize HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n")
    # the client offers up to 1 GiB, but stops as soon as the server answers
    answer, sent = send_until_answered(server, head, iter(lambda: b"x" * 65536, None), budget=1 << 30)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 256 << 20, f"the server took {sent} bytes before answering"
    assert rss_kib(server) - rss_before < 200 * 1024
    assert httpx.get(f"{server.url}/v1/health", timeout=5).status_code == 200


def test_a_chunked_body_is_stopped_at_the_limit(server):
    limit = limit_of(server)
    head = (b"POST /v1/post-training/preference-optimize HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    # an endless body: only a server that stops reading at the limit answers before the budget is spent
    answer, sent = send_until_answered(server, head, iter(lambda: chunk, None), budget=limit + (256 << 20))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < limit + (256 << 20), f"the server read {sent} bytes of a body limited to {limit}"
    assert httpx.get(f"{server.url}/v1/health", timeout=5).status_code == 200


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (mounting one needs root; skipped elsewhere)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_while_snapshotting_the_data_is_a_507(tmp_path, small_disk, tiny_model, seed_file):
    srv = StackServer(tmp_path / "server", provider={"output_dir": str(small_disk / "out")},
                      extra_roots=[tiny_model.parent]).start()
    try:
        rows = json.loads(seed_file.read_text())["data"]
        data = tmp_path / "server" / "big.jsonl"
        data.write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(5000)))  # ~1 MB
        r = httpx.post(f"{srv.url}/v1/post-training/preference-optimize", timeout=60,
                       json=dpo_request("no-room", str(tiny_model), str(data)))
        assert r.status_code == 507, r.text
        assert "No space left on device" in r.json()["error"]["message"]
        assert "data snapshot" in r.json()["error"]["message"]
        assert [p.name for p in (small_disk / "out").iterdir() if not p.name.startswith(".")] == []  # the half-written job directory is gone
        assert httpx.get(f"{srv.url}/v1/post-training/job/status", params={"job_uuid": "no-room"}).status_code == 404
    finally:
        srv.stop()
