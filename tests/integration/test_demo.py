"""The README's demo command runs end to end (after the install that scripts/demo.sh does first)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pictures import assert_shows_curves
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

    # then a job that learns: its logged loss falls from log 2 and its reward margin rises, and its picture exists
    assert "completed   phase=completed step 40/40" in out
    logged = [(float(loss), float(margin)) for loss, margin in
              re.findall(r"step +\d+/40  loss=([\d.]+)  rewards/margins=([+-][\d.]+)", out)]
    assert len(logged) >= 3, out[-3000:]
    (first_loss, first_margin), (last_loss, last_margin) = logged[0], logged[-1]
    assert first_loss == 0.6931 and last_loss < 0.2 and last_margin > first_margin + 2, logged
    curves = re.search(r"its training curves .*: (\S+/curves\.png)", out)
    assert curves, out[-3000:]
    assert_shows_curves(Path(curves.group(1)))
