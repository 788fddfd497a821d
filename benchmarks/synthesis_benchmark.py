"""Speed of the Table 3 generator: KV-cache sampling (images/s, tokens/s) and the training step (images/s,
counted-FLOPs model FLOP utilisation).

    python benchmarks/synthesis_benchmark.py                                   # B, batches 64 and 128, bf16 (one GPU)
    python benchmarks/synthesis_benchmark.py --tiny --out benchmarks/results/synthesis_tiny_cpu.json   # CPU smoke

Random weights, 16 × 16 grid (256 positions × 8 codes per image), 6 labels, temperature 1, no CFG (the paper's
sampling). Targets on one H100 (issue 12): ≥ 100 images/s sampling B at batch 128, ≥ 35 % MFU training B at
batch 128. FLOPs are counted by ``torch.utils.flop_counter`` on the training step as it runs (forward +
backward, batch 1, scaled by the batch); MFU = counted FLOPs/s over the dense bf16 peak (``--peak-tflops``,
default looked up from the GPU name). ``--compile`` wraps the trunk and the codebook head in ``torch.compile``
(falling back to eager, recorded in the JSON, if compilation fails). Writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from generation.ar_model import ARGenerator, count_training_flops, get_ar_config
from generation.sample import generate
# the training step with the trainer's settings and optimiser (generation.ar_training, not the trainer itself)
from generation.ar_training import TrainConfig, make_optimizer
from training.flops import peak_flops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def try_compile(model: ARGenerator, mode: str) -> str:
    """Compile the trunk and the per-code head call; returns 'compiled' or the reason it stayed eager."""
    try:
        model.trunk = torch.compile(model.trunk, mode=mode, dynamic=True)
        model.head.codebook_logits = torch.compile(model.head.codebook_logits, mode=mode, dynamic=True)
        return "compiled"
    except Exception as error:  # an unsupported backend must not cost the eager numbers
        return f"eager (torch.compile failed: {type(error).__name__}: {error})"


def time_sampling(model: ARGenerator, batch: int, repeats: int, amp_dtype, device: torch.device) -> dict:
    labels = torch.arange(batch, device=device) % model.config.num_labels
    generator = torch.Generator(device=device).manual_seed(0)
    generate(model, labels, generator=generator, amp_dtype=amp_dtype)  # warm-up (allocations, compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        generate(model, labels, generator=generator, amp_dtype=amp_dtype)
        sync(device)
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    return {"batch": batch, "seconds_per_batch": seconds, "images_per_s": batch / seconds,
            "tokens_per_s": batch * model.K * model.L / seconds, "repeats": repeats}


def time_training(model: ARGenerator, batch: int, steps: int, amp_dtype, device: torch.device, peak: float | None) -> dict:
    ids = torch.randint(0, model.V, (batch, model.K, model.L), device=device)
    labels = torch.randint(0, model.config.num_labels + 1, (batch,), device=device)
    flops_per_image = count_training_flops(model, ids[:1], labels[:1])
    optimizer = make_optimizer(TrainConfig(), model)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
            loss = model.loss(ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(steps):
        sync(device)
        began = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    achieved = flops_per_image * batch / seconds
    result = {"batch": batch, "seconds_per_step": seconds, "images_per_s": batch / seconds,
              "flops_per_image_fwd_bwd": flops_per_image, "achieved_tflops": achieved / 1e12, "steps": steps}
    if peak:
        result["mfu"] = achieved / peak
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    model.eval()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="B", help="generator preset (default B, the paper's)")
    parser.add_argument("--head", default="sequential", choices=["sequential", "independent"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128], help="sampling batches (default 64 128)")
    parser.add_argument("--train-batch", type=int, default=128, help="training-step batch (default 128; 0 = skip)")
    parser.add_argument("--grid", type=int, default=16, help="token grid side (default 16: 256 px images)")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling batches (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile trunk and head (mode --compile-mode)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak for MFU (default: from the GPU name)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke mode: tiny preset, 4 × 4 grid, batches 2 4, training batch 4, 1 repeat")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.grid, args.batch_sizes, args.train_batch, args.repeats, args.steps = "tiny", 4, [2, 4], 4, 1, 2

    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = ARGenerator(get_ar_config(args.preset, head=args.head, grid=(args.grid, args.grid), num_labels=6)).to(device).eval()
    peak = peak_flops(device, args.peak_tflops or 0.0)
    result = {"preset": args.preset, "head": args.head, "parameters": model.num_parameters(), "grid": [args.grid] * 2,
              "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "dtype": "bf16 autocast" if amp_dtype else "fp32", "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "peak_tflops": None if peak is None else peak / 1e12}
    if args.train_batch:
        result["training"] = time_training(model, args.train_batch, args.steps, amp_dtype, device, peak)
        t = result["training"]
        print(f"training  batch {t['batch']}: {t['images_per_s']:.1f} images/s, {t['achieved_tflops']:.3f} TFLOP/s counted"
              + (f", MFU {100 * t['mfu']:.1f} %" if "mfu" in t else " (no peak known: pass --peak-tflops for MFU)"), flush=True)
    result["compile"] = try_compile(model, args.compile_mode) if args.compile else "eager"
    result["sampling"] = []
    for batch in args.batch_sizes:
        s = time_sampling(model, batch, args.repeats, amp_dtype, device)
        result["sampling"].append(s)
        print(f"sampling  batch {batch}: {s['images_per_s']:.2f} images/s, {s['tokens_per_s']:.0f} tokens/s "
              f"({s['seconds_per_batch']:.2f} s per batch, KV cache, {result['compile']})", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
