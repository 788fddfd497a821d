"""Time the tokenizer's own training step (forward + backward + fused AdamW), without loss networks.

A lower bound for the full stage-1 step (which adds LPIPS, the discriminator and the teacher): it shows
what the tokenizer itself costs at a given batch, precision and checkpointing setting.

    python benchmarks/tokenizer_train_step.py --preset large --batch 32 --device cuda
    python benchmarks/tokenizer_train_step.py --preset tiny --batch 2 --img-size 64 --iters 2   # CPU

Prints and writes JSON (--out) with images/s, step-time percentiles and peak memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import meditok
from meditok.info import forward_flops


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large")
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of ViT blocks and decoder stages")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder (compile time excluded: "
                   "raise --warmup)")
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions (MedITok.speed_up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = meditok.build_meditok(args.preset, device=device).train()
    model.set_grad_checkpointing(args.grad_ckpt)
    model.speed_up(channels_last=args.channels_last, compile=args.compile)  # what train.py's flags do
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    flops = forward_flops(model, args.img_size)
    train_flops = 3 * (flops["encode"] + flops["decode"])  # forward + backward ≈ 3× forward
    results = []
    for batch in args.batch:
        x = torch.rand(batch, 3, args.img_size, args.img_size, device=device) * 2 - 1
        cast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext())
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        try:
            for i in range(args.warmup + args.iters):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with cast:
                    out = model(x)
                    loss = (0.2 * F.l1_loss(out["reconstruction"], x) + F.mse_loss(out["reconstruction"], x)
                            + out["vq_loss"])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            results.append({"batch": batch, "error": "out of memory"})
            del x
            torch.cuda.empty_cache()
            continue
        ips = batch * len(times) / sum(times)
        rec = {"preset": args.preset, "batch": batch, "img_size": args.img_size, "dtype": args.dtype,
               "grad_ckpt": args.grad_ckpt, "compile": args.compile, "channels_last": args.channels_last,
               "images_per_s": ips, "step_ms_p50": statistics.median(times) * 1e3,
               "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024 ** 3 if device.type == "cuda" else None,
               "model_tflops": train_flops * ips / 1e12, "loss": loss.detach().item()}
        results.append(rec)
        print(json.dumps(rec))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "device": str(device),
                                              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
