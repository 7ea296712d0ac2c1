"""Print the latest results (bench/results/*.json) as the Markdown tables of bench/RESULTS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def latest(pattern: str) -> dict | None:
    files = sorted(RESULTS.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def main() -> None:
    full = latest("full-*.json") or latest("quick-*.json")
    if full:
        print(f"### CPU ({full['cpu']['cpus']} cores, torch {full['cpu']['torch']}), run {full['started']}\n")
        print(f"Command: `.venv/bin/python {full['command'].split('bench/', 1)[-1] if 'bench/' in full['command'] else full['command']}`"
              .replace("python run.py", "python bench/run.py") + "\n")
        print(full["table"])
        print()
    memory = latest("memory-*.json")
    if memory:
        print(f"### Reference-model memory, run {memory['started']}\n")
        print("Command: `.venv/bin/python bench/run.py --memory`\n")
        print(memory["table"] + "\n")
    gpu_file = RESULTS / "gpu" / "gpu_bench.json"
    if gpu_file.exists():
        gpu = json.loads(gpu_file.read_text())
        print(f"### GPU ({gpu['device']}; {', '.join(f'{k} {v}' for k, v in gpu['env'].items())})\n")
        print(f"Command: `{gpu['command']}` (see RESULTS.md for the device call)\n")
        print(gpu["text"])


if __name__ == "__main__":
    sys.exit(main())
