"""What a job's curves picture costs (llama_stack_provider_trl/curves.py): the matplotlib import the warm worker
pays once, and the CPU time of one drawing (DPO: 3 panels) of a 40-step history, each drawing in a freshly forked
process as in a job. CPU seconds (process_time), which other processes on the machine disturb less than wall time.

    .venv/bin/python bench/curves.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import numpy  # noqa: F401 - already imported in the worker by torch, so not counted

    from llama_stack_provider_trl import history

    start = time.process_time()
    from llama_stack_provider_trl import curves

    print(f"import matplotlib (with curves.py): {time.process_time() - start:.3f} s CPU")
    job_dir = Path(tempfile.mkdtemp())
    for step in [1, *range(10, 41, 10)]:
        history.append(job_dir, step, {"loss": 0.7 / step, "rewards/margins": 0.2 * step,
                                       "rewards/accuracies": min(1.0, 0.05 * step)}, total_steps=40)
    costs = []
    for _ in range(args.rounds):
        read, write = os.pipe()
        if os.fork() == 0:
            start = time.process_time()
            curves.draw(job_dir, "dpo", "bench")
            os.write(write, f"{time.process_time() - start:.4f}".encode())
            os._exit(0)
        os.wait()
        costs.append(float(os.read(read, 64)))
    print(f"one drawing (3 panels, forked process): median {statistics.median(costs):.3f} s CPU, "
          f"min {min(costs):.3f}, max {max(costs):.3f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
