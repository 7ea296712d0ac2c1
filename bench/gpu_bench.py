"""GPU benchmark: the bench's DPO job through the provider's recipe (recipes/dpo.py, called with a
JobContext as a job's worker process builds one) and through plain TRL, each in a fresh process, alternated;
on a ~0.5B-parameter Llama model built from a config (random weights), bf16 autocast over fp32 weights.
Reports tokens/s and MFU against the measured bf16 matmul peak and the datasheet peak.

    python bench/gpu_bench.py --out $OUT                          # on the GPU machine (500m preset)
    python bench/gpu_bench.py --device cpu --preset tiny --out /tmp/g  # dry run here

Where llama-stack is not installed (the GPU machine), the provider's package is imported with stand-ins
for the two llama-stack names its recipe path touches (KVStoreReference, two error classes); the
recipe, the plan, the config and TRL are the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import common  # noqa: E402

DATASHEET_BF16_DENSE = {"H100": 989e12, "H200": 989e12}  # SXM, dense (no sparsity), TFLOP/s


def install_stubs() -> None:
    """Import the provider without llama-stack: skip the two package __init__s that import the server side,
    and stand in for the three names the recipe path uses."""
    import pydantic

    pkg = REPO / "llama_stack_provider_trl"
    for name, path in (("llama_stack_provider_trl", pkg), ("llama_stack_provider_trl.api", pkg / "api")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module

    class KVStoreReference(pydantic.BaseModel):
        backend: str = "kv_default"
        namespace: str = "post_training::trl"

    class ConflictError(ValueError):
        pass

    class ResourceNotFoundError(ValueError):
        pass

    for name in ("llama_stack", "llama_stack.core", "llama_stack.core.storage", "llama_stack_api",
                 "llama_stack_api.common"):
        sys.modules.setdefault(name, types.ModuleType(name))
    datatypes = types.ModuleType("llama_stack.core.storage.datatypes")
    datatypes.KVStoreReference = KVStoreReference
    errors = types.ModuleType("llama_stack_api.common.errors")
    errors.ConflictError, errors.ResourceNotFoundError = ConflictError, ResourceNotFoundError
    sys.modules["llama_stack.core.storage.datatypes"] = datatypes
    sys.modules["llama_stack_api.common.errors"] = errors


def provider_job(args) -> None:
    """One job through recipes/dpo.train, in this (fresh) process. Prints one JSON line."""
    t0 = time.perf_counter()
    try:
        if args.stubs:
            raise ImportError
        import llama_stack  # noqa: F401
    except ImportError:
        install_stubs()
    import torch

    from llama_stack_provider_trl.api.models import PreferenceOptimizeRequest
    from llama_stack_provider_trl.config import TrlPostTrainingConfig
    from llama_stack_provider_trl.data import read_jsonl, write_jsonl
    from llama_stack_provider_trl.plan import make_plan
    from llama_stack_provider_trl.recipes import dpo
    from llama_stack_provider_trl.recipes.context import JobContext

    t_import = time.perf_counter() - t0
    model = Path(args.model)
    rows = read_jsonl(Path(args.data))
    config = TrlPostTrainingConfig(device=args.device, output_dir=str(args.job_root), model_roots=["/"],
                                   dataset_roots=["/"])
    request = PreferenceOptimizeRequest.model_validate(
        common.request_body("gpu-bench", model, args.steps, batch_size=args.batch_size))
    plan = make_plan(request.training_config, len(rows), config)
    job_dir = config.resolved_output_dir() / request.job_uuid
    reports: list[tuple[float, dict]] = []

    def report(persist: bool = False, **fields) -> None:
        reports.append((time.perf_counter(), fields))

    ctx = JobContext(job_uuid=request.job_uuid, job_dir=job_dir, request=request.model_dump(mode="json"),
                     config=config, plan=plan, report=report)
    write_jsonl(rows, ctx.data_dir / "train.jsonl")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    checkpoints = dpo.train(ctx)
    wall = time.perf_counter() - t
    phases = {f.get("phase"): ts for ts, f in reports if f.get("phase")}
    step_ends = [ts for ts, f in reports if "step" in f and "epoch" in f]
    progress = {}
    for _, f in reports:
        progress.update(f)
    out = {
        "import_s": round(t_import, 3), "wall_s": round(wall, 3),
        "train_s": progress.get("elapsed_seconds"),
        "load_s": round(phases.get("training", t) - t, 3) if "training" in phases else None,
        "save_s": round(t + wall - phases["saving"], 3) if "saving" in phases else None,
        "steps": progress.get("step"), "loss": progress.get("loss"),
        "tokens_from_progress": round((progress.get("tokens_per_second") or 0) * (progress.get("elapsed_seconds") or 0)),
        "resources": progress.get("resources_allocated"),
        "bytes_written": common.du(job_dir), "checkpoint": checkpoints[0].path,
        "peak_rss": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024,
    }
    if len(step_ends) > 4:
        gaps = sorted(b - a for a, b in zip(step_ends[2:], step_ends[3:]))
        out["step_s_median"] = gaps[len(gaps) // 2]
    if args.device == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


def measure_bf16(device: str) -> dict:
    import torch

    if device != "cuda":
        return {"note": "cpu dry run", **common.measure_matmul("float32", "cpu", 0.3)}
    out = {}
    for name, (m, k, n) in {"square_8192": (8192, 8192, 8192), "linear_2048x1024x4096": (2048, 1024, 4096)}.items():
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        reps = 20 if m == 8192 else 200
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        out[name] = 2 * m * k * n * reps / (start.elapsed_time(end) / 1000)
    out["peak"] = max(out.values())
    return out


def run_child(cmd: list[str], log) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    log.write(proc.stderr[-20000:])
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - t, 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="500m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="rounds at the first batch size")
    p.add_argument("--rounds-large", type=int, default=2, help="rounds at the other batch sizes")
    p.add_argument("--warmup", action="store_true",
                   help="one discarded plain TRL run first (a fresh machine's first CUDA process is slower)")
    p.add_argument("--batch-sizes", default="4,32", help="the bench job's batch, then a larger one that feeds the GPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-bench")))
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-bench-work"))
    p.add_argument("--stubs", action="store_true", help="use the llama-stack stand-ins even where it is installed")
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--job-root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return provider_job(args)

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    common.WORKSPACE = args.work  # models and data under the scratch dir
    data = common.data_file()
    t = time.perf_counter()
    model = common.model_dir(args.preset)
    params = common.count_params(model)
    env = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "trl", "datasets", "peft", "accelerate", "pyarrow"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            env[name] = f"missing: {exc}"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"env {env}, device {gpu}, model {args.preset}: {params['total'] / 1e6:.0f}M parameters "
          f"(built in {time.perf_counter() - t:.1f} s)", flush=True)
    matmul = measure_bf16(args.device)
    print(f"matmul {({k: round(v / 1e12, 1) for k, v in matmul.items() if k != 'note'})} TFLOP/s", flush=True)

    runs: list[dict] = []
    log = (args.out / "children.log").open("w")
    if args.warmup:
        res = run_child([sys.executable, str(BENCH / "plain_trl.py"), str(model), str(data), str(args.work / "warmup"),
                         "--steps", "3", "--device", args.device], log)
        subprocess.run(["rm", "-rf", str(args.work / "warmup")])
        print(f"warm-up (discarded): {json.dumps({k: res.get(k) for k in ('error', 'wall_s', 'import_s')})}", flush=True)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for r in range(args.rounds if batch == int(args.batch_sizes.split(",")[0]) else args.rounds_large):
            order = ("provider", "plain") if r % 2 == 0 else ("plain", "provider")
            for side in order:
                job_root = args.work / f"{side}-b{batch}-r{r}"
                subprocess.run(["rm", "-rf", str(job_root)])
                if side == "provider":
                    cmd = [sys.executable, __file__, "--child", "--device", args.device, "--model", str(model),
                           "--data", str(data), "--job-root", str(job_root), "--steps", str(args.steps),
                           "--batch-size", str(batch)] + (["--stubs"] if args.stubs else [])
                else:
                    cmd = [sys.executable, str(BENCH / "plain_trl.py"), str(model), str(data), str(job_root),
                           "--steps", str(args.steps), "--device", args.device, "--batch-size", str(batch),
                           "--step-times"]
                res = run_child(cmd, log)
                res.update(side=side, batch=batch, round=r)
                runs.append(res)
                subprocess.run(["rm", "-rf", str(job_root)])
                print(f"{side} batch {batch} round {r}: " + json.dumps(
                    {k: res.get(k) for k in ("error", "wall_s", "train_s", "step_s_median", "import_s", "gpu_peak_bytes",
                                             "bytes_written", "tokens", "tokens_from_progress", "resources")}), flush=True)

    # tokens per job come from plain TRL's count (TRL's attention-mask sum; same rows, same tokenization)
    flops_per_token = common.dpo_flops_per_token(params["matmul"])
    datasheet = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in gpu), None)
    table = []
    for batch in sorted({r["batch"] for r in runs}):
        plain_tokens = next((r["tokens"] for r in runs if r["batch"] == batch and r.get("tokens")), None)
        for side in ("plain", "provider"):
            rs = [r for r in runs if r["batch"] == batch and r["side"] == side and "error" not in r]
            if not rs or not plain_tokens:
                table.append({"side": side, "batch": batch, "error": [r.get("error") for r in runs
                                                                      if r["batch"] == batch and r["side"] == side]})
                continue
            train_s = common.median([r["train_s"] for r in rs])
            step_s = common.median([r.get("step_s_median") for r in rs])
            tokens_per_step = plain_tokens / args.steps
            row = {
                "side": side, "batch": batch, "n": len(rs), "wall_s": common.median([r["wall_s"] for r in rs]),
                "train_s": train_s, "tokens_per_s": plain_tokens / train_s,
                "steady_step_s": step_s, "steady_tokens_per_s": tokens_per_step / step_s if step_s else None,
                "gpu_peak_gib": (common.median([r.get("gpu_peak_bytes") for r in rs]) or 0) / 2**30,
                "bytes_written_mib": common.median([r["bytes_written"] for r in rs]) / 2**20,
            }
            for name, peak in (("measured", matmul["peak"]), ("datasheet", datasheet)):
                if peak:
                    row[f"mfu_{name}"] = flops_per_token * plain_tokens / train_s / peak
                    if step_s:
                        row[f"steady_mfu_{name}"] = flops_per_token * tokens_per_step / step_s / peak
            table.append(row)
    lines = [f"{gpu}: {args.preset} preset, {params['total'] / 1e6:.0f}M parameters ({params['matmul'] / 1e6:.0f}M in "
             f"matmuls), {args.steps} DPO steps, max length 256, bf16 autocast; bf16 matmul measured "
             f"{matmul['peak'] / 1e12:.0f} TFLOP/s" + (f", datasheet {datasheet / 1e12:.0f}" if datasheet else ""), "",
             "| batch | side | n | wall s | train s | tokens/s | MFU (measured / datasheet) | steady step ms | "
             "steady tokens/s | steady MFU (measured / datasheet) | GPU peak GiB | written MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        if "error" in row:
            lines.append(f"| {row['batch']} | {row['side']} | failed: {row['error']} |")
            continue
        pct = lambda k: f"{row[k] * 100:.1f}%" if row.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {row['batch']} | {row['side']} | {row['n']} | {row['wall_s']:.2f} | {row['train_s']:.2f} | "
                     f"{row['tokens_per_s']:.0f} | {pct('mfu_measured')} / {pct('mfu_datasheet')} | "
                     f"{(row['steady_step_s'] or 0) * 1000:.1f} | {row['steady_tokens_per_s'] or 0:.0f} | "
                     f"{pct('steady_mfu_measured')} / {pct('steady_mfu_datasheet')} | {row['gpu_peak_gib']:.1f} | "
                     f"{row['bytes_written_mib']:.0f} |")
    for batch in sorted({r["batch"] for r in runs}):
        pr = {row["side"]: row for row in table if row["batch"] == batch and "error" not in row}
        if len(pr) == 2:
            lines.append(f"\nbatch {batch}: provider/plain wall {pr['provider']['wall_s'] / pr['plain']['wall_s']:.3f}, "
                         f"train {pr['provider']['train_s'] / pr['plain']['train_s']:.3f}")
    text = "\n".join(lines)
    print(text)
    result = {"env": env, "device": gpu, "preset": args.preset, "params": params, "matmul": matmul,
              "flops_per_token": flops_per_token, "runs": runs, "table": table, "text": text,
              "command": " ".join(sys.argv)}
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
