"""Plain TRL: the bench's DPO job with DPOTrainer and nothing else, in a fresh process.

Hyperparameters are the ones the provider derives from the bench's request (see common.JOB);
bf16 off, gradient checkpointing off, no eval, no dataloader workers, no intermediate saves.
Prints one JSON line: import/load/train/save seconds, real tokens, peak RSS, bytes written.

    python bench/plain_trl.py MODEL_DIR DATA.jsonl OUT_DIR [--threads N] [--trl-defaults]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--trl-defaults", action="store_true",
                   help="leave bf16 and gradient checkpointing at DPOConfig's defaults (on)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (gradient checkpointing off)")
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: bf16 autocast over fp32 weights, as the provider does on a GPU")
    p.add_argument("--batch-size", type=int, default=0, help="per-device batch (0: the bench job's)")
    p.add_argument("--step-times", action="store_true", help="also report the median step time after 3 steps")
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import JOB

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - T0

    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(x) for x in args.data.read_text().splitlines() if x.strip()]
    dataset = Dataset.from_list(rows)
    cuda = args.device == "cuda"
    extra = {} if args.trl_defaults else {"bf16": cuda or args.bf16, "gradient_checkpointing": False}
    config = DPOConfig(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size or JOB["batch_size"],
        learning_rate=JOB["lr"],
        weight_decay=JOB["weight_decay"],
        warmup_steps=JOB["warmup_steps"],
        beta=JOB["beta"],
        loss_type=[JOB["loss_type"]],
        max_length=JOB["max_length"],
        precompute_ref_log_probs=args.precompute,
        use_cpu=not cuda,
        logging_steps=JOB["logging_steps"],
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        train_sampling_strategy="random" if JOB["shuffle"] else "sequential",
        **extra,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    step_ends: list[float] = []
    if args.step_times:
        from transformers import TrainerCallback

        class StepTimes(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                step_ends.append(time.perf_counter())

        trainer.add_callback(StepTimes())
    t_load = time.perf_counter() - t

    t = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t

    t = time.perf_counter()
    final = args.out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    t_save = time.perf_counter() - t

    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    print(json.dumps({
        "import_s": round(t_import, 3), "load_s": round(t_load, 3), "train_s": round(t_train, 3),
        "save_s": round(t_save, 3), "wall_s": round(t_load + t_train + t_save, 3),
        "process_s": round(time.perf_counter() - T0, 3), "tokens": int(tokens),
        "steps": trainer.state.global_step, "torch_threads": torch.get_num_threads(),
        "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_written": sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()),
        "train_loss": trainer.state.log_history[-1].get("train_loss"),
        **({"step_s_median": sorted(b - a for a, b in zip(step_ends[2:], step_ends[3:]))[(len(step_ends) - 3) // 2]}
           if len(step_ends) > 4 else {}),
        **({"gpu_peak_bytes": torch.cuda.max_memory_allocated(), "gpu": torch.cuda.get_device_name()} if cuda else {}),
    }))


if __name__ == "__main__":
    main()
