"""Shared pieces of the benchmark: the job's settings, its data, the models, and the
arithmetic (FLOPs, MFU, peak memory, bytes on disk). No torch import at module level."""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
WORKSPACE = RESULTS / "ws"  # models, data, server roots: everything here is git-ignored

# The one DPO job every variant runs.
JOB = dict(
    rows=64, steps=20, batch_size=4, max_length=256, beta=0.1, loss_type="sigmoid", lr=1e-6,
    weight_decay=0.01,  # the provider's default, set explicitly on the plain side
    warmup_steps=2,  # the provider's warmup_ratio 0.1 x 20 steps
    logging_steps=10,  # the provider's default
    shuffle=False,  # sequential order on both sides: the same rows, so the same token counts
)

DATASET_ID = "bench-prefs"


def request_body(job_uuid: str, model: Path, steps: int, batch_size: int | None = None,
                 training_extra: dict | None = None, **algo) -> dict:
    """The bench job as a post_training request: 2 epochs x 10 steps = 20 steps over 64 rows at batch 4."""
    batch_size = batch_size or JOB["batch_size"]
    per_epoch = min(steps, max(1, JOB["rows"] // batch_size))
    epochs = -(-steps // per_epoch)
    while steps % epochs:
        epochs += 1
    return {
        "job_uuid": job_uuid,
        "finetuned_model": str(model),
        "algorithm_config": {"type": "dpo", "beta": JOB["beta"], "loss_type": JOB["loss_type"], **algo},
        "training_config": {
            "n_epochs": epochs,
            "max_steps_per_epoch": steps // epochs,
            "max_seq_length": JOB["max_length"],
            "data_config": {"dataset_id": DATASET_ID, "batch_size": batch_size, "shuffle": JOB["shuffle"]},
            "optimizer_config": {"optimizer_type": "adamw", "lr": JOB["lr"], "weight_decay": JOB["weight_decay"],
                                 "num_warmup_steps": JOB["warmup_steps"]},
            **(training_extra or {}),
        },
    }


WORDS = (
    "the model learns from pairs of answers and prefers the helpful one over the careless one while the "
    "reference stays frozen so the policy does not drift too far from where it started gradient descent "
    "lowers the loss step by step and the learning rate sets how far each step goes a clear answer names "
    "the facts explains the reasoning and stops when the question is answered water boils at one hundred "
    "degrees paris is the capital of france light water and carbon dioxide become sugar and oxygen"
).split()


def make_rows(n: int = JOB["rows"], seed: int = 0) -> list[dict]:
    """n preference pairs, the same every run: prompts of 15-40 words, answers of 40-110 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        return " ".join(words).capitalize() + "."

    return [{"prompt": text(15, 40) + "?", "chosen": text(40, 110), "rejected": text(40, 110)} for _ in range(n)]


def data_file() -> Path:
    path = WORKSPACE / "data" / "prefs.jsonl"
    rows = make_rows()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def model_dir(preset: str) -> Path:
    """Build the preset once (random weights, tokenizer trained on the bench data); reuse after."""
    out = WORKSPACE / "models" / preset
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    sys.path.insert(0, str(REPO / "scripts"))
    from build_tiny_model import build

    build(out, preset, [data_file()])
    return out


def count_params(model_path: Path) -> dict:
    """Parameter counts from the safetensors header: total, and the matmul ones (input embedding excluded:
    it is a lookup, not a matmul)."""
    import struct

    total = embed = 0
    for f in model_path.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
            if "embed_tokens" in name:
                embed += n
    return {"total": total, "matmul": total - embed}


def dpo_flops_per_token(n_matmul: int, reference_forward: bool = True) -> int:
    """6N per token for the policy's forward+backward, plus 2N for the reference model's forward."""
    return 6 * n_matmul + (2 * n_matmul if reference_forward else 0)


def measure_matmul(dtype: str = "float32", device: str = "cpu", seconds: float = 1.0) -> dict:
    """Achieved matmul throughput (FLOP/s) on a square 2048^3 product and on a linear-layer shape
    (1400 tokens x 512 -> 2048, the 34M model's MLP), in this process with its thread settings."""
    import torch

    dt = getattr(torch, dtype)
    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "linear_1400x512x2048": (1400, 512, 2048)}.items():
        a = torch.randn(m, k, dtype=dt, device=device)
        b = torch.randn(k, n, dtype=dt, device=device)
        for _ in range(2):
            a @ b
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:
                sync()
                if time.perf_counter() - start > seconds:
                    break
        out[name] = 2 * m * k * n * reps / (time.perf_counter() - start)
    out["peak"] = max(out.values())
    return out


def du(path: Path) -> int:
    """Bytes in the files under path (what a job wrote)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_peak_rss(pid: int) -> int:
    """Peak resident memory (VmHWM, bytes) of pid, or the largest in its process tree."""
    import psutil

    best = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return best


def tree_rss(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return max(p.memory_info().rss for p in procs)
    except psutil.NoSuchProcess:
        return 0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, q: float):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def cpu_info() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_1m": os.getloadavg()[0]}
