"""The README's demo command runs end to end (after the install that scripts/demo.sh does first)."""

import os
import subprocess
import sys

import pytest
from stack_server import REPO, free_port

pytestmark = pytest.mark.integration


def test_demo_trains_and_prints_the_artifacts():
    env = {**os.environ, "DEMO_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "inline::trl" in out
    assert "-> 200" in out
    assert "completed   phase=completed step 4/4" in out
    assert '"identifier": "dpo-training-' in out and "/final" in out
    assert "reward_scale ignored" in out
