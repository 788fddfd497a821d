"""Benchmark the full training step (either stage, every loss on) and tokenization/decoding/reconstruction.

Times, after warm-up and with device synchronisation, ``utilities.trainer.Trainer.step`` — the same code
``train.py`` runs — on a synthetic batch already on the device (the compute alone) and, with
``--real-data``, fed by the real CSV data loader (shows whether loading keeps up). Then, unless
``--no-inference``, the token API over a grid of batch sizes and resolutions (``evaluation.efficiency``).
Writes ``benchmark.json`` (and prints a Markdown summary): images/s, step-time percentiles, peak memory,
achieved TFLOP/s and MFU (tokenizer FLOPs counted by ``torch.utils.flop_counter``; loss networks not
counted, so MFU is a lower bound).

    python -m evaluation.benchmark --preset large --stage 1 --batch-sizes 16 32 --biomedclip external/biomedclip \\
        --dino external/dinov2_vits14 --lpips-vgg external/vgg16.pth           # one H100
    python -m evaluation.benchmark --preset tiny --img-size 64 --batch-sizes 2 --steps 2 \\
        --biomedclip tiny --dino tiny --lpips-vgg random --device cpu            # CPU smoke run (CI)

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
from meditok.model import MedITok
from utilities.args import Args
from utilities.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(trainer: Trainer, batch_size: int, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Images in [-1, 1] and (stage 2) caption token ids, generated on the device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = trainer.img_size
    batch = {"image": (torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1).to(device)}
    if trainer.args.stage == 2 and trainer.teacher is not None:
        # ids past the special tokens; padding-free captions are the worst case for the text tower
        vocab = int(getattr(trainer.teacher.text, "vocab_size", 1000))
        batch["text"] = torch.randint(5, max(vocab, 6), (batch_size, trainer.teacher.context_length), generator=g).to(device)
    return batch


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
            trainer.step(batches, step=10_000, total_steps=1_000_000, warmup_steps=0, disc_start=0, disc_warmup=0)
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
        logs, _, _ = trainer.step(batches, step=10_000, total_steps=1_000_000, warmup_steps=0, disc_start=0,
                                  disc_warmup=0)
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


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help="per-GPU batches to time")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the tokenizer")
    p.add_argument("--grad-ckpt-parts", default="all", choices=MedITok.CHECKPOINT_PARTS,
                   help="what --grad-ckpt recomputes (train.py --grad_ckpt_parts)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions (train.py --channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile tokenizer and loss networks (train.py --compile)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--biomedclip", default="", help="teacher source (folder, hub id, 'tiny'); '' = default path")
    p.add_argument("--dino", default="", help="discriminator backbone source ('tiny' for tests)")
    p.add_argument("--lpips-vgg", default="", help="LPIPS VGG16 weights ('random' for tests)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per batch size")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--real-data", action="store_true",
                   help="also time the step fed by the CSV data loader (--train-csv/--train-root)")
    p.add_argument("--train-csv", default="datasets/meta/examples_train.csv")
    p.add_argument("--train-root", default="datasets/examples")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--no-inference", action="store_true", help="skip the tokenize/decode/reconstruct grid")
    p.add_argument("--inference-settings", nargs="+", default=["16x256", "64x256", "8x512"],
                   help="BATCHxSIZE cells for the token API (default: 16x256 64x256 8x512)")
    p.add_argument("--out", default="outputs/benchmark", help="output folder (benchmark.json)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args = Args(stage=a.stage, preset=a.preset, img_size=a.img_size, device=a.device, precision=a.precision,
                grad_ckpt=a.grad_ckpt, grad_ckpt_parts=a.grad_ckpt_parts, channels_last=a.channels_last, compile=a.compile,
                compile_backend=a.compile_backend, biomedclip=a.biomedclip, dino=a.dino, lpips_vgg=a.lpips_vgg,
                train_csv=a.train_csv, train_root=a.train_root, num_workers=a.num_workers, batch_size=a.batch_sizes[0])
    torch.manual_seed(0)
    trainer = Trainer(args, device)
    env = {**report.environment(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "precision": "bf16" if trainer.bf16 else "fp32", "losses": trainer.losses_summary(),
           "channels_last": a.channels_last, "compile": a.compile,
           "compile_backend": a.compile_backend if a.compile else None,
           "tokenizer_gflops_per_image_train": trainer.train_flops_per_image / 1e9,
           "peak_tflops": trainer.peak_flops / 1e12 if trainer.peak_flops else None}
    results: Dict[str, Any] = {"environment": env, "command": " ".join(sys.argv), "train_step": [], "inference": []}
    ckpt = a.grad_ckpt and a.grad_ckpt_parts  # False, or what is recomputed

    for bs in a.batch_sizes:
        cell = {"stage": a.stage, "batch": bs, "img_size": trainer.img_size, "grad_ckpt": ckpt, "data": "synthetic"}
        try:
            batch = synthetic_batch(trainer, bs, device)
            cell.update(time_steps(trainer, lambda: [batch], a.steps, a.warmup, device))
        except torch.cuda.OutOfMemoryError:
            cell["error"] = "out of memory"
            torch.cuda.empty_cache()
        results["train_step"].append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != "last_losses"}), flush=True)

    if a.real_data:
        from train import build_dataset
        from utilities.training_data import build_loader
        bs = a.batch_sizes[0]
        args.batch_size = bs
        dataset = build_dataset(args, trainer.img_size, trainer.text_tokenizer, Path(a.out))
        loader = build_loader(dataset, bs, a.num_workers, 0, 0, 1, device.type)
        state = {"it": iter(loader)}

        def next_real():
            try:
                return [next(state["it"])]
            except StopIteration:
                state["it"] = iter(loader)
                return [next(state["it"])]
        cell = {"stage": a.stage, "batch": bs, "img_size": trainer.img_size, "grad_ckpt": ckpt,
                "data": f"loader({a.train_csv}, {a.num_workers} workers)"}
        cell.update(time_steps(trainer, next_real, a.steps, a.warmup, device))
        results["train_step"].append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != "last_losses"}), flush=True)

    if not a.no_inference:
        from evaluation.efficiency import _parse_setting, measure
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
                results["inference"].append(rec)
        model.train()

    out = Path(a.out)
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
    report.write_outputs(out, "benchmark", results, "\n".join(lines),
                         {"train_step": results["train_step"], "inference": results["inference"]})
    print("\n".join(lines))
    print(f"wrote {out / 'benchmark.json'} and benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
