import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

from stack_server import StackServer  # noqa: E402


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """Everything the servers may read lives here: it is their model and dataset root."""
    return tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="session")
def tiny_model(workspace) -> Path:
    from build_tiny_model import build

    return build(workspace / "tiny-llama", "tiny", [REPO / "test_dpo_data.json"])


@pytest.fixture(scope="session")
def seed_rows() -> list[dict]:
    return json.loads((REPO / "test_dpo_data.json").read_text())["data"]


@pytest.fixture(scope="session")
def seed_file(workspace) -> Path:
    path = workspace / "test_dpo_data.json"
    shutil.copy(REPO / "test_dpo_data.json", path)
    return path


@pytest.fixture(scope="session")
def server(workspace, tiny_model, seed_file):
    """One server shared by the tests that don't need to restart it; the workspace is its root."""
    srv = StackServer(workspace / "server", extra_roots=[workspace]).start()
    yield srv
    srv.stop()
