"""Benchmark the full training step (either stage, every loss on) and tokenization/decoding/reconstruction.

Times, after warm-up and with device synchronisation, ``tokenizer_training.trainer.Trainer.step`` — the same code
``train.py`` runs — on a synthetic batch already on the device (the compute alone) and, with
``--real-data``, fed by the real CSV data loader (shows whether loading keeps up). Then, unless
``--no-inference``, the token API over a grid of batch sizes and resolutions (``evaluation.efficiency``).
Writes ``benchmark.json`` (and prints a Markdown summary): images/s, step-time percentiles, peak memory,
achieved TFLOP/s and MFU (tokenizer FLOPs counted by ``torch.utils.flop_counter``; loss networks not
counted, so MFU is a lower bound).

    python -m tokenizer_training.benchmark --preset large --stage 1 --batch-sizes 16 32 --biomedclip external/biomedclip \\
        --dino external/dinov2_vits14 --lpips-vgg external/vgg16.pth           # one H100
    python -m tokenizer_training.benchmark --config stage1_tiny_cpu --batch-sizes 2 --steps 2 --no-inference  # CPU smoke run

Every training flag of ``python train.py --help`` (and ``--config``) sets up the trainer being timed;
the benchmark's own defaults are the ``large`` preset at 256 px on the GPU when there is one.

Speed does not depend on weight values: offline machines can use `python scripts/make_tiny_networks.py
--full-size` (real architectures, random weights) for the teacher and discriminator sources.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from evaluation import report
from tokenizer_training.args import build_parser, parse_args
from tokenizer_training.schedule import Schedule
from tokenizer_training.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(trainer: Trainer, batch_size: int, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Images in [-1, 1] and (with a text teacher) caption token ids, generated on the device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = trainer.img_size
    batch = {"image": (torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1).to(device)}
    text = trainer.alignment("text")
    if text is not None:
        # ids past the special tokens; padding-free captions are the worst case for the text tower
        vocab = int(getattr(text.teacher.text, "vocab_size", 1000))
        # kept on the host, as the data loader gives them: the trainer trims their padding there, then copies
        batch["text"] = torch.randint(5, max(vocab, 6), (batch_size, text.teacher.context_length), generator=g)
    return batch


def steady_step(trainer: Trainer) -> int:
    """A step past the learning-rate warm-up and the discriminator's start and warm-up: every loss active."""
    s = trainer.schedule
    return max(s.warmup_steps, s.disc_start + s.disc_warmup)


def count_host_syncs(trainer: Trainer, next_batches, device: torch.device) -> Optional[int]:
    """GPU only: synchronising calls made by one more training step, counted by CUDA's sync debug mode (each
    one stalls the host until the GPU is idle). None on CPU."""
    if device.type != "cuda":
        return None
    import warnings
    batches = next_batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(batches, steady_step(trainer))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncing = [w for w in caught if "synchroniz" in str(w.message).lower()]
    for w in syncing[:5]:
        print(f"[sync] {w.filename}:{w.lineno}: {w.message}", flush=True)
    return len(syncing)


def time_steps(trainer: Trainer, next_batches, steps: int, warmup: int, device: torch.device) -> Dict[str, Any]:
    """Run warmup + steps training steps; returns timing of the timed ones and the last losses."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, images = [], 0
    logs: Dict[str, torch.Tensor] = {}
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        batches = next_batches()
        logs = trainer.step(batches, steady_step(trainer))
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            images += sum(b["image"].shape[0] for b in batches)
    syncs = count_host_syncs(trainer, next_batches, device)
    values = {k: float(v) for k, v in logs.items()}
    ips = images / sum(times)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    record = {
        "images_per_s": ips, "step_ms_p50": statistics.median(times) * 1e3, "step_ms_p90": q[8] * 1e3,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else None,
        "tokenizer_tflops": trainer.train_flops_per_image * ips / 1e12,
        "mfu": trainer.train_flops_per_image * ips / trainer.peak_flops if trainer.peak_flops else None,
        "host_syncs_per_step": syncs,
        "losses_finite": all(v == v and abs(v) != float("inf") for v in values.values()),
        "last_losses": values,
    }
    return record


BENCHMARK_DEFAULTS = {"preset": "large", "img_size": 256, "num_workers": 8,
                      "device": "cuda" if torch.cuda.is_available() else "cpu"}


def parse(argv: Optional[List[str]] = None):
    """(benchmark options, training Args): the benchmark's own flags here, every other flag (and --config)
    through the training parser, so the timed trainer is configured exactly as ``train.py`` would be.
    ``--help`` prints both and returns None."""
    p = argparse.ArgumentParser(prog="python -m tokenizer_training.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help="per-GPU batches to time")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--real-data", action="store_true",
                   help="also time the step fed by the training data loader (--train-csv/--train-root or shards)")
    p.add_argument("--no-inference", action="store_true", help="skip the tokenize/decode/reconstruct grid")
    p.add_argument("--inference-settings", nargs="+", default=["16x256", "64x256", "8x512"],
                   help="BATCHxSIZE cells for the token API (default: 16x256 64x256 8x512)")
    p.add_argument("--out", default="outputs/benchmark", help="output folder (benchmark.json)")
    a, rest = p.parse_known_args(argv)
    if a.help:
        p.print_help()
        print("\nTraining flags (python train.py --help):")
        build_parser().print_help()
        return None
    return a, parse_args(rest, defaults=BENCHMARK_DEFAULTS)


def environment(trainer: Trainer, args, device: torch.device) -> Dict[str, Any]:
    """The machine and the timed configuration, recorded beside the numbers."""
    return {**report.environment(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": "bf16" if trainer.bf16 else "fp32", "losses": trainer.losses_summary(),
            "channels_last": args.channels_last, "compile": args.compile,
            "compile_backend": args.compile_backend if args.compile else None,
            "compile_form": args.compile_form if args.compile else None, "upsample": args.upsample or "transposed",
            "tokenizer_gflops_per_image_train": trainer.train_flops_per_image / 1e9,
            "peak_tflops": trainer.peak_flops / 1e12 if trainer.peak_flops else None}


def time_training_steps(trainer: Trainer, args, a, device: torch.device) -> List[Dict[str, Any]]:
    """One cell per batch size on a synthetic batch, and with --real-data one fed by the training data loader."""
    cells = []
    ckpt = args.grad_ckpt and args.grad_ckpt_parts  # False, or what is recomputed
    for bs in a.batch_sizes:
        cell = {"stage": args.stage, "batch": bs, "img_size": trainer.img_size, "grad_ckpt": ckpt, "data": "synthetic"}
        try:
            batch = synthetic_batch(trainer, bs, device)
            cell.update(time_steps(trainer, lambda: [batch], a.steps, a.warmup, device))
        except torch.cuda.OutOfMemoryError:
            cell["error"] = "out of memory"
            torch.cuda.empty_cache()
        cells.append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != "last_losses"}), flush=True)
    if a.real_data:
        from tokenizer_training.training_data import TrainingData
        data = TrainingData(args, trainer.img_size, trainer.text_tokenizer, Path(a.out), 0, 1, device.type)
        source = args.train_shards or args.train_csv
        cell = {"stage": args.stage, "batch": a.batch_sizes[0], "img_size": trainer.img_size, "grad_ckpt": ckpt,
                "data": f"loader({source}, {args.num_workers} workers)"}
        cell.update(time_steps(trainer, lambda: data.next_batches(1), a.steps, a.warmup, device))
        cells.append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != "last_losses"}), flush=True)
    return cells


def time_token_api(trainer: Trainer, a, device: torch.device) -> List[Dict[str, Any]]:
    """tokenize / decode / reconstruct throughput of the trained tokenizer at each --inference-settings cell."""
    from evaluation.efficiency import _parse_setting, measure
    records = []
    model = trainer.tokenizer.eval()
    for setting in a.inference_settings:
        b, s = _parse_setting(setting)
        for task in ("tokenize", "decode", "reconstruct"):
            try:
                rec = measure(model, task, "bf16" if trainer.bf16 else "fp32", b, s, device, warmup=3,
                              iters=max(2, a.steps // 2))
            except torch.cuda.OutOfMemoryError:
                rec = {"task": task, "batch": b, "img_size": s, "error": "out of memory"}
                torch.cuda.empty_cache()
            records.append(rec)
    model.train()
    return records


def to_markdown(results: Dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"## Training step — {env['gpu'] or env['device']}, {env['precision']}, losses {env['losses']}", "",
             "| stage | batch | px | ckpt | data | images/s | p50 ms | peak GB | MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for c in results["train_step"]:
        if "error" in c:
            lines.append(f"| {c['stage']} | {c['batch']} | {c['img_size']} | {c['grad_ckpt']} | {c['data']} | {c['error']} ||||")
            continue
        mem = f"{c['peak_memory_gb']:.1f}" if c["peak_memory_gb"] is not None else "–"
        mfu = f"{c['mfu']:.1%}" if c["mfu"] is not None else "–"
        lines.append(f"| {c['stage']} | {c['batch']} | {c['img_size']} | {c['grad_ckpt']} | {c['data']} | "
                     f"{c['images_per_s']:.1f} | {c['step_ms_p50']:.0f} | {mem} | {mfu} |")
    if results["inference"]:
        lines += ["", "| task | batch | px | images/s | peak GB |", "|---|---|---|---|---|"]
        for r in results["inference"]:
            if "error" in r:
                lines.append(f"| {r['task']} | {r['batch']} | {r['img_size']} | {r['error']} | |")
                continue
            mem = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "–"
            lines.append(f"| {r['task']} | {r['batch']} | {r['img_size']} | {r['images_per_s']:.1f} | {mem} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parsed = parse(argv)
    if parsed is None:
        return 0
    a, args = parsed
    args.batch_size = a.batch_sizes[0]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    trainer = Trainer(args, device)
    # a nominal epoch of 1,000 steps; every step is timed past the warm-ups, with every loss active
    trainer.schedule = Schedule.from_args(args, steps_per_epoch=1000)
    results: Dict[str, Any] = {"environment": environment(trainer, args, device), "command": " ".join(sys.argv),
                               "train_step": time_training_steps(trainer, args, a, device), "inference": []}
    if not a.no_inference:
        results["inference"] = time_token_api(trainer, a, device)
    out, table = Path(a.out), to_markdown(results)
    report.write_outputs(out, "benchmark", results, table,
                         {"train_step": results["train_step"], "inference": results["inference"]})
    print(table)
    print(f"wrote {out / 'benchmark.json'} and benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
