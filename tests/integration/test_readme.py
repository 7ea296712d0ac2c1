"""The README's examples run as written, in order, against a real server.

Every ```bash and ```python block in README.md is run, top to bottom, from a working directory laid out like the
repository for the demo (models/tiny-llama, test_dpo_data.json, test_sft_data.jsonl), against a real
`llama stack run` server started there, with `localhost:8321` rewritten to that server's address. Bash blocks run
under `bash -euo pipefail` (so their curl calls must fail on an HTTP error: -f / --fail-with-body); Python blocks
run with this interpreter, each in a fresh process, so each must be complete by itself.

A block that is not meant to run here (installation, starting the server itself) is marked by the line
`<!-- readme-test: skip -->` right before its opening fence. Fences with another or no language (json, output
samples) are never run.

Exit codes alone would let a block that starts a job which then fails pass, so afterwards every job the README
started must have ended as the README says: completed, or cancelled where it cancels.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from stack_server import REPO, StackServer

pytestmark = pytest.mark.integration

SKIP_MARKER = "<!-- readme-test: skip -->"
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, language, code) of every bash/python block not marked to skip."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if language in ("bash", "python") and previous != SKIP_MARKER:
            blocks.append((start + 1, language, "\n".join(lines[start + 1:end]) + "\n"))
        i = end + 1
    return blocks


def test_blocks_are_found_and_the_skip_marker_is_honoured():
    text = "\n".join([
        "```bash", "echo run", "```", SKIP_MARKER, "", "```bash", "echo skipped", "```",
        "```json", "{}", "```", "```python", "print(1)", "```",
    ])
    assert [(lang, code) for _, lang, code in readme_blocks(text)] == [("bash", "echo run\n"), ("python", "print(1)\n")]


@pytest.fixture(scope="module")
def readme_server(workspace, tiny_model):
    root = workspace / "readme"
    root.mkdir()
    shutil.copytree(tiny_model, root / "models" / "tiny-llama")
    for name in ("test_dpo_data.json", "test_sft_data.jsonl"):
        shutil.copy(REPO / name, root / name)
    srv = StackServer(root).start()
    yield srv
    srv.stop()


def test_readme_examples_run_in_order_against_a_server(readme_server, tmp_path):
    server = readme_server
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 10, "the README lost its examples (or the parser its way)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for line, language, code in blocks:
        code = code.replace("http://localhost:8321", server.url).replace("localhost:8321", server.url.split("//")[1])
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=server.root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (
            f"README.md line {line} ({language}) exited {done.returncode}:\n{code}\n--- stdout\n{done.stdout[-3000:]}"
            f"\n--- stderr\n{done.stderr[-3000:]}\n--- server\n{server.log_tail(30)}")

    jobs = [j["job_uuid"] for j in httpx.get(f"{server.url}/v1/post-training/jobs", timeout=30).json()["data"]]
    assert {"dpo-training-001", "dpo-002", "dpo-cancelled", "sft-001", "dpo-sdk-1"} <= set(jobs), jobs
    for job in jobs:
        status = server.wait(job, timeout=300)
        expected = "cancelled" if job.endswith("-cancelled") else "completed"
        assert status["status"] == expected, (job, status)
        if expected == "completed":
            assert status["checkpoints"], (job, status)

    # the README's requests train what they say: all 16 rows a pass, epochs counted as the request counts them
    status = server.status("dpo-training-001")
    assert status["progress"]["step"] == 4 and status["progress"]["epoch"] == pytest.approx(1.0)
    assert any("reward_scale ignored" in w for w in status["warnings"])
    status = server.status("dpo-002")
    assert (status["progress"]["step"], status["progress"]["epoch"]) == (8, pytest.approx(2.0))
    assert status["checkpoints"][0]["epoch"] == 2

    # an adapter loads from anywhere on the machine, without the server's working directory or the hub
    adapter = server.status("sft-001")["checkpoints"][0]
    assert adapter["kind"] == "adapter"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys; from peft import AutoPeftModelForCausalLM; "
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(m.peft_config['default'].base_model_name_or_path)")
    done = subprocess.run([sys.executable, "-c", code, adapter["path"]], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    base = done.stdout.strip().splitlines()[-1]
    assert Path(base).is_absolute() and Path(base).resolve() == (server.root / "models" / "tiny-llama").resolve()


def test_shipped_run_yaml_picks_the_device_and_every_variable_it_reads_is_documented():
    run_yaml = (REPO / "run.yaml").read_text()
    readme = (REPO / "README.md").read_text()
    assert "device: ${env.TRL_DEVICE:=auto}" in run_yaml
    shipped = run_yaml + (REPO / "scripts" / "demo.py").read_text()
    variables = dict(re.findall(r"\$\{env\.(\w+):=([^}]*)\}", run_yaml))
    variables.update(dict(re.findall(r"os\.environ\.get\(\"(\w+)\", \"([^\"]*)\"\)", shipped)))
    assert {"TRL_DEVICE", "TRL_OUTPUT_DIR", "SQLITE_STORE_DIR", "DEMO_PORT"} <= set(variables)
    for name, default in variables.items():
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
        assert rows, f"{name} is read by a shipped file but not documented in the README's table"
        assert f"`{default}`" in rows[0], f"{name}: the README's default differs from the shipped {default!r}"

