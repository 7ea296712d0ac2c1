"""One command for the whole CPU benchmark: this provider (through a real `llama stack run`
server's REST API) against plain TRL, on the same DPO job, in alternation, repeated.

    .venv/bin/python bench/run.py            # 3 rounds on the 34m and tiny presets (~25 min on 2 cores)
    .venv/bin/python bench/run.py --quick    # 1 round
    .venv/bin/python bench/run.py --memory   # reference-model memory options on the 150m preset only

Writes bench/results/<mode>-<time>.json and prints a table. See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common  # noqa: E402
from common import DATASET_ID, JOB, RESULTS, WORKSPACE, request_body  # noqa: E402
from stack_server import StackServer  # noqa: E402

PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the provider, through the server ------------------------------------------------------------


class LatencyProbe(threading.Thread):
    """GET /v1/post-training/job/status at a fixed rate (loopback), at most `count` requests."""

    def __init__(self, url: str, job_uuid: str, rate: float = 20.0, count: int = 600) -> None:
        super().__init__(daemon=True)
        self.url, self.job_uuid, self.rate, self.count = url, job_uuid, rate, count
        self.latencies: list[float] = []
        self.timeline: list[tuple] = []  # (seconds since start, latency ms, phase, step)
        self.t0 = time.perf_counter()
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            next_at = time.perf_counter()
            while len(self.latencies) < self.count and not self.stop_event.is_set():
                t = time.perf_counter()
                r = client.get("/v1/post-training/job/status", params={"job_uuid": self.job_uuid})
                self.latencies.append(time.perf_counter() - t)
                body = r.json() if r.status_code == 200 else {}
                progress = body.get("progress") or {}
                self.timeline.append((round(t - self.t0, 3), round(self.latencies[-1] * 1000, 2),
                                      progress.get("phase"), progress.get("step")))
                if body.get("status") in ("completed", "failed", "cancelled"):
                    return
                next_at += 1.0 / self.rate
                time.sleep(max(0.0, next_at - time.perf_counter()))

    def run_idle(self) -> None:
        """The same requests to an idle server (a finished job's status): the baseline."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            for _ in range(self.count):
                t = time.perf_counter()
                client.get("/v1/post-training/job/status", params={"job_uuid": self.job_uuid})
                self.latencies.append(time.perf_counter() - t)
                self.timeline.append((round(t - self.t0, 3), round(self.latencies[-1] * 1000, 2), "idle", None))
                time.sleep(max(0.0, 1.0 / self.rate - (time.perf_counter() - t)))

    def summary(self) -> dict:
        ms = [x * 1000 for x in self.latencies]
        worst = sorted(self.timeline, key=lambda x: -x[1])[:5]
        return {"requests": len(ms), "rate_per_s": self.rate, "p50_ms": common.percentile(ms, 0.5),
                "p99_ms": common.percentile(ms, 0.99), "max_ms": max(ms) if ms else None,
                "worst": worst, "by_phase": {ph: {"n": len(v), "p50_ms": common.percentile(v, 0.5),
                                                  "p99_ms": common.percentile(v, 0.99)}
                                             for ph in {x[2] for x in self.timeline}
                                             for v in [[x[1] for x in self.timeline if x[2] == ph]]}}


def wait_final(server: StackServer, job_uuid: str, interval: float, timeout: float = 3600) -> dict:
    """Poll status every `interval` s; a job's end is the server's completed_at, so polling less loses no
    precision."""
    deadline = time.monotonic() + timeout
    while True:
        status = server.status(job_uuid)
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_uuid} still {status['status']} after {timeout}s\n{server.log_tail()}")
        time.sleep(interval)


POLL_S = 1.0


def run_provider_job(server: StackServer, model: Path, job_uuid: str, steps: int, probe: bool = False,
                     training_extra: dict | None = None, **algo) -> dict:
    body = request_body(job_uuid, model, steps, training_extra=training_extra, **algo)
    t0_wall, t0 = time.time(), time.perf_counter()
    r = httpx.post(f"{server.url}/v1/post-training/preference-optimize", json=body, timeout=60)
    r.raise_for_status()
    accepted = time.perf_counter() - t0
    prober = None
    if probe:
        prober = LatencyProbe(server.url, job_uuid)
        prober.start()
    status = wait_final(server, job_uuid, POLL_S)
    if prober:
        prober.stop_event.set()
        prober.join()
    if status["status"] != "completed":
        raise RuntimeError(f"job {job_uuid} {status['status']}: {status.get('error')}\n{server.log_tail()}")
    completed = datetime.fromisoformat(status["completed_at"]).timestamp()
    started = datetime.fromisoformat(status["started_at"]).timestamp()
    progress = status["progress"] or {}
    job_dir = server.output_dir / job_uuid
    out = {
        "job_uuid": job_uuid,
        # request sent -> the server recorded completed (server clock == client clock: same machine)
        "wall_s": round(completed - t0_wall, 3),
        "accept_s": round(accepted, 3),
        "queue_to_start_s": round(started - t0_wall, 3),
        "train_s": progress.get("elapsed_seconds"),
        "steps": progress.get("step"),
        "loss": progress.get("loss"),
        "bytes_written": common.du(job_dir),
        "files": sorted(str(p.relative_to(job_dir)) for p in job_dir.rglob("*") if p.is_file()),
        "server_peak_rss": common.tree_peak_rss(server.process.pid),
    }
    if prober:
        out["status_latency"] = prober.summary()
    return out


def provider_round(preset: str, model: Path, tag: str, steps: int, warm_jobs: int, probe: bool,
                   provider_overrides: dict | None = None, algo: dict | None = None,
                   training_extra: dict | None = None, warmup_model: Path | None = None) -> dict:
    root = WORKSPACE / "servers" / tag
    shutil.rmtree(root, ignore_errors=True)
    server = StackServer(root, provider=provider_overrides or {}, extra_roots=[WORKSPACE]).start()
    try:
        idle_rss = common.tree_rss(server.process.pid)
        server.register_rows(DATASET_ID, common.make_rows())
        jobs = []
        imported_rss = None
        if warmup_model is not None:  # a tiny job first: torch/TRL imported, so the baseline excludes them
            run_provider_job(server, warmup_model, f"{tag}-warmup", 2)
            imported_rss = common.tree_rss(server.process.pid)
        for i in range(1 + warm_jobs + int(probe)):
            kind = "first" if i == 0 else "warm"
            j = run_provider_job(server, model, f"{tag}-{i}", steps, probe=probe and i == warm_jobs + 1,
                                 training_extra=training_extra, **(algo or {}))
            j["kind"] = kind + ("+probe" if "status_latency" in j else "")
            log(f"  provider {preset} {j['kind']}: {j['wall_s']:.2f} s (train {j['train_s']} s), "
                f"{j['bytes_written'] / 2**20:.1f} MiB, server peak RSS {j['server_peak_rss'] / 2**20:.0f} MiB"
                + (f", status p50/p99 {j['status_latency']['p50_ms']:.1f}/{j['status_latency']['p99_ms']:.1f} ms"
                   if "status_latency" in j else ""))
            jobs.append(j)
            if i == 0 and probe:
                idle = LatencyProbe(server.url, j["job_uuid"], count=40)
                idle.run_idle()
                idle_latency = idle.summary()
        extra = {"idle_status_latency": idle_latency} if probe else {}
        if imported_rss is not None:
            extra["imported_rss"] = imported_rss
        return {**extra, "preset": preset, "server_idle_rss": idle_rss, "server_peak_rss": common.tree_peak_rss(server.process.pid),
                "jobs": jobs}
    finally:
        server.stop()
        shutil.rmtree(root / "out", ignore_errors=True)


# ---- plain TRL --------------------------------------------------------------------------------------


def run_plain(preset: str, model: Path, tag: str, steps: int, *flags: str) -> dict:
    out = WORKSPACE / "plain" / tag
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, str(common.BENCH / "plain_trl.py"), str(model), str(common.data_file()), str(out), "--steps", str(steps),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"TOKENIZERS_PARALLELISM": "false",
                                                                    **__import__("os").environ})
    if proc.returncode:
        raise RuntimeError(f"plain TRL failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["flags"] = list(flags)
    shutil.rmtree(out, ignore_errors=True)
    log(f"  plain {preset} {' '.join(flags) or 'best'}: load+train+save {result['wall_s']:.2f} s "
        f"(train {result['train_s']:.2f} s, import {result['import_s']:.1f} s), "
        f"{result['bytes_written'] / 2**20:.1f} MiB, peak RSS {result['peak_rss'] / 2**20:.0f} MiB")
    return result


# ---- summary ---------------------------------------------------------------------------------------


def summarize(results: dict) -> dict:
    summary = {}
    matmul_peak = common.median([m["peak"] for m in results["matmul"]])
    matmul_bf16_peak = common.median([m["peak"] for m in results.get("matmul_bf16", [])]) or matmul_peak
    for preset, rounds in results["runs"].items():
        params = common.count_params(common.model_dir(preset))
        plain = [r["plain"] for r in rounds]
        plain1 = [r["plain_1thread"] for r in rounds]
        plain_bf16 = [r["plain_bf16"] for r in rounds if "plain_bf16" in r]
        tokens = plain[0]["tokens"]
        flops_per_step = common.dpo_flops_per_token(params["matmul"]) * tokens / JOB["steps"]
        first = [j for r in rounds for j in r["provider"]["jobs"] if j["kind"] == "first"]
        warm = [j for r in rounds for j in r["provider"]["jobs"] if j["kind"] == "warm"]
        warm = warm or [j for r in rounds for j in r["provider"]["jobs"] if j["kind"] == "warm+probe"]
        probed = [j for r in rounds for j in r["provider"]["jobs"] if "status_latency" in j]

        def row(name, wall, train, rss, written, peak=matmul_peak):
            train_m = common.median(train)
            return {
                "variant": name, "n": len(wall), "wall_s": common.median(wall), "train_s": train_m,
                "tokens_per_s": tokens / train_m if train_m else None,
                "mfu": flops_per_step * JOB["steps"] / train_m / peak if train_m else None,
                "peak_rss_mib": common.median(rss) / 2**20 if rss else None,
                "bytes_written_mib": common.median(written) / 2**20 if written else None,
            }

        plain_rows = [
            row(f"plain TRL, torch default threads ({plain[0]['torch_threads']})", [p["wall_s"] for p in plain],
                [p["train_s"] for p in plain], [p["peak_rss"] for p in plain], [p["bytes_written"] for p in plain]),
            row("plain TRL, 1 thread", [p["wall_s"] for p in plain1], [p["train_s"] for p in plain1],
                [p["peak_rss"] for p in plain1], [p["bytes_written"] for p in plain1]),
        ]
        best_plain = min(plain_rows, key=lambda x: x["wall_s"])  # fp32, as the provider trains on the CPU
        if plain_bf16:
            plain_rows.append(row("plain TRL, bf16 autocast (MFU vs bf16 peak)", [p["wall_s"] for p in plain_bf16],
                                  [p["train_s"] for p in plain_bf16], [p["peak_rss"] for p in plain_bf16],
                                  [p["bytes_written"] for p in plain_bf16], peak=matmul_bf16_peak))
        best_any = min(plain_rows, key=lambda x: x["wall_s"])
        rows = [
            *plain_rows,
            row("provider, warm server", [j["wall_s"] for j in warm], [j["train_s"] for j in warm],
                [r["provider"]["server_peak_rss"] for r in rounds], [j["bytes_written"] for j in warm]),
            row("provider, first job", [j["wall_s"] for j in first], [j["train_s"] for j in first],
                [r["provider"]["server_peak_rss"] for r in rounds], [j["bytes_written"] for j in first]),
        ]
        p, (w, f) = best_plain, rows[len(plain_rows):]
        summary[preset] = {
            "best_plain": p["variant"], "best_plain_any_precision": best_any["variant"],
            "params": params, "tokens_per_job": tokens, "flops_per_step": flops_per_step,
            "rows": rows,
            "ratios": {
                "warm_wall_over_plain": w["wall_s"] / p["wall_s"],
                "warm_wall_over_best_any": w["wall_s"] / best_any["wall_s"],
                "warm_minus_plain_s": w["wall_s"] - p["wall_s"],
                "first_minus_warm_s": f["wall_s"] - w["wall_s"],
                "warm_train_over_plain": w["train_s"] / p["train_s"],
                "bytes_over_plain": w["bytes_written_mib"] / p["bytes_written_mib"],
                "rss_over_plain": w["peak_rss_mib"] / p["peak_rss_mib"],
            },
            "server_idle_rss_mib": common.median([r["provider"]["server_idle_rss"] for r in rounds]) / 2**20,
            "status_latency": [j["status_latency"] for j in probed],
            "probed_train_s": [j["train_s"] for j in probed],
            "status_latency_idle": [r["provider"]["idle_status_latency"] for r in rounds
                                    if "idle_status_latency" in r["provider"]],
            "plain_import_s": common.median([x["import_s"] for x in plain + plain1]),
        }
    return summary


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(results: dict) -> str:
    lines = []
    mm = results["matmul"]
    lines.append(f"fp32 matmul (median of {len(mm)}): square 2048 {common.median([m['square_2048'] for m in mm]) / 1e9:.0f}"
                 f" GFLOP/s, linear 1400x512x2048 {common.median([m['linear_1400x512x2048'] for m in mm]) / 1e9:.0f}"
                 f" GFLOP/s; MFU is against the better of the two")
    lines.append("")
    lines.append("| model | variant | n | wall s | train s | tokens/s | MFU | peak RSS MiB | written MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for preset, s in results["summary"].items():
        for r in s["rows"]:
            lines.append(f"| {preset} | {r['variant']} | {r['n']} | {fmt(r['wall_s'])} | {fmt(r['train_s'])} | "
                         f"{fmt(r['tokens_per_s'], '.0f')} | {fmt(r['mfu'] * 100 if r['mfu'] else None, '.1f')}% | "
                         f"{fmt(r['peak_rss_mib'], '.0f')} | {fmt(r['bytes_written_mib'], '.1f')} |")
    lines.append("")
    if results.get("matmul_bf16"):
        lines[0] += (f"; bf16 matmul {common.median([m['peak'] for m in results['matmul_bf16']]) / 1e9:.0f} GFLOP/s "
                     "(the bf16 row's MFU is against it)")
    lines.append("Ratios are provider (warm server, fp32 as it trains on the CPU) over the best fp32 plain TRL row of "
                 "the same model; `vs any` over the best plain row of any precision.")
    lines.append("")
    lines.append("| model | warm/plain wall | vs any | warm-plain s | first-warm s | warm/plain train | bytes ratio | RSS ratio | server idle RSS MiB | status p50/p99 ms while training | idle | train s while polled at 20/s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, s in results["summary"].items():
        q = s["ratios"]
        idle = "; ".join(f"{x['p50_ms']:.1f}/{x['p99_ms']:.1f}" for x in s["status_latency_idle"]) or "-"
        lat = "; ".join(f"{x['p50_ms']:.1f}/{x['p99_ms']:.1f} (n={x['requests']})" for x in s["status_latency"]) or "-"
        polled = ", ".join(f"{x:.2f}" for x in s.get("probed_train_s", [])) or "-"
        lines.append(f"| {preset} | {q['warm_wall_over_plain']:.3f} | {q.get('warm_wall_over_best_any', 0):.3f} | "
                     f"{q['warm_minus_plain_s']:+.2f} | "
                     f"{q['first_minus_warm_s']:+.2f} | {q['warm_train_over_plain']:.3f} | {q['bytes_over_plain']:.2f} | "
                     f"{q['rss_over_plain']:.2f} | {s['server_idle_rss_mib']:.0f} | {lat} | {idle} | {polled} |")
    for name, v in results.get("plain_variants", {}).items():
        lines.append(f"\nplain TRL variant {name}: wall {v['wall_s']:.2f} s, train {v['train_s']:.2f} s")
    text = "\n".join(lines)
    print(text)
    return text


# ---- memory mode --------------------------------------------------------------------------------


LORA = {"rank": 16, "alpha": 32, "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True}
CHECKPOINTING = {"efficiency_config": {"enable_activation_checkpointing": True}}
MEMORY_VARIANTS = {  # name: (algorithm_config additions, training_config additions)
    "full DPO, reference copy": ({}, {}),
    "precompute_ref_log_probs": ({"precompute_ref_log_probs": True}, {}),
    "LoRA (r=16, attention+MLP)": ({"lora": LORA}, {}),
    "LoRA + activation checkpointing": ({"lora": LORA}, CHECKPOINTING),
    "full DPO + activation checkpointing": ({}, CHECKPOINTING),
}


def memory_mode(preset: str, steps: int) -> dict:
    model = common.model_dir(preset)
    out = {"preset": preset, "steps": steps, "params": common.count_params(model), "variants": {}}
    tiny = common.model_dir("tiny")
    for name, (algo, training_extra) in MEMORY_VARIANTS.items():
        log(f"memory: {preset} {name}")
        res = provider_round(preset, model, f"mem-{preset}-{len(out['variants'])}", steps, warm_jobs=0, probe=False,
                             algo=algo, training_extra=training_extra, warmup_model=tiny)
        job = res["jobs"][0]
        out["variants"][name] = {
            "server_peak_rss_mib": res["server_peak_rss"] / 2**20,
            "server_idle_rss_mib": res["server_idle_rss"] / 2**20,
            "imported_rss_mib": res["imported_rss"] / 2**20,
            "delta_mib": (res["server_peak_rss"] - res["imported_rss"]) / 2**20,
            "wall_s": job["wall_s"], "train_s": job["train_s"], "bytes_written_mib": job["bytes_written"] / 2**20,
        }
        log(f"  peak {out['variants'][name]['server_peak_rss_mib']:.0f} MiB (idle {res['server_idle_rss'] / 2**20:.0f})")
    full = out["variants"]["full DPO, reference copy"]
    lines = [f"Reference-model memory, {preset} preset ({out['params']['total'] / 1e6:.0f}M parameters), "
             f"{steps} steps, fresh server per variant; baseline = the server's RSS after a 2-step tiny job "
             "(torch, transformers, TRL imported)", "",
             "| variant | server peak RSS MiB | baseline MiB | peak over baseline MiB | vs full DPO (over baseline) | wall s | written MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, v in out["variants"].items():
        lines.append(f"| {name} | {v['server_peak_rss_mib']:.0f} | {v['imported_rss_mib']:.0f} | {v['delta_mib']:.0f} | "
                     f"{v['delta_mib'] / full['delta_mib']:.2f} | {v['wall_s']:.1f} | {v['bytes_written_mib']:.1f} |")
    out["table"] = "\n".join(lines)
    print(out["table"])
    return out


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round instead of three")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--presets", default="34m,tiny")
    p.add_argument("--steps", type=int, default=JOB["steps"])
    p.add_argument("--warm-jobs", type=int, default=1, help="warm jobs per server after its first job")
    p.add_argument("--plain-variants", action="store_true",
                   help="also time plain TRL with 1 thread and with DPOConfig's defaults (bf16, checkpointing)")
    p.add_argument("--memory", action="store_true", help="only the reference-model memory comparison (150m)")
    p.add_argument("--memory-preset", default="150m")
    p.add_argument("--memory-steps", type=int, default=4)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common.data_file()

    if args.memory:
        result = {"mode": "memory", "started": stamp, "cpu": common.cpu_info(), "job": JOB,
                  **memory_mode(args.memory_preset, args.memory_steps)}
        path = RESULTS / f"memory-{stamp}.json"
        path.write_text(json.dumps(result, indent=1))
        log(f"wrote {path}")
        return

    rounds = args.rounds or (1 if args.quick else 3)
    presets = args.presets.split(",")
    models = {preset: common.model_dir(preset) for preset in presets}
    results = {"mode": "quick" if args.quick else "full", "started": stamp, "cpu": common.cpu_info(), "job": JOB,
               "steps": args.steps, "command": " ".join(sys.argv), "matmul": [], "runs": {p: [] for p in presets}}
    for r in range(rounds):
        results["matmul"].append(common.measure_matmul())
        results.setdefault("matmul_bf16", []).append(common.measure_matmul("bfloat16"))
        log(f"round {r + 1}/{rounds}: fp32 matmul peak {results['matmul'][-1]['peak'] / 1e9:.0f} GFLOP/s, "
            f"load {common.cpu_info()['loadavg_1m']:.1f}")
        order = presets if r % 2 == 0 else presets[::-1]
        for preset in order:
            entry = {}
            steps = (["provider", "plain"] if (r + presets.index(preset)) % 2 == 0 else ["plain", "provider"])
            for side in steps:
                if side == "provider":
                    entry["provider"] = provider_round(preset, models[preset], f"{preset}-r{r}", args.steps,
                                                       args.warm_jobs, probe=(r == 0))
                else:
                    entry["plain"] = run_plain(preset, models[preset], f"{preset}-r{r}", args.steps)
                    entry["plain_1thread"] = run_plain(preset, models[preset], f"{preset}-r{r}-t1", args.steps,
                                                       "--threads", "1")
                    entry["plain_bf16"] = run_plain(preset, models[preset], f"{preset}-r{r}-bf16", args.steps,
                                                    "--bf16")
            results["runs"][preset].append(entry)
    if args.plain_variants:
        results["plain_variants"] = {}
        for flags in (["--trl-defaults"],):
            results["plain_variants"][" ".join(flags)] = run_plain(presets[0], models[presets[0]], "variant",
                                                                   args.steps, *flags)
    results["matmul"].append(common.measure_matmul())
    results["summary"] = summarize(results)
    results["table"] = print_table(results)
    path = RESULTS / f"{results['mode']}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
