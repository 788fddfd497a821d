"""Speed of the joint image–report diffusion model: training step and sampling (random ids, no data).

    python benchmarks/diffusion_benchmark.py                                   # tiny on CPU (CI), ~1 min
    python benchmarks/diffusion_benchmark.py --preset B --img-size 256 --sample-steps 16 64 \\
        --batch 64 --sample-batch 64 --device cuda                            # one GPU, bf16

Training: forward + backward + AdamW of the ELBO loss (all three tasks mixed), samples/s and peak memory.
Sampling: text→image (images/s), image→report (text tokens/s) and joint, at each --sample-steps, with the
confidence-ordered sampler, CFG 1 (one forward per step; CFG > 1 doubles it). Writes JSON (--out).
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

from generation.diffusion.masking import MaskSchedule, diffusion_loss
from generation.diffusion.model import JointDiffusionTransformer, get_config
from generation.diffusion.sampler import SAMPLE_TASKS, SamplerOptions, sample


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train(model, batch: int, iters: int, warmup: int, autocast, device) -> dict:
    cfg = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    schedule = MaskSchedule()
    text = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), device=device)
    image = torch.randint(0, cfg.codebook_size, (batch, cfg.num_codebooks, cfg.num_positions), device=device)
    labels = torch.randint(0, cfg.num_conditions, (batch,), device=device)
    times = []
    model.train()
    for i in range(warmup + iters):
        sync(device)
        began = time.perf_counter()
        with autocast():
            loss = diffusion_loss(model, text, image, labels, schedule)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    median = statistics.median(times)
    return {"batch": batch, "step_s_median": median, "samples_per_s": batch / median}


@torch.no_grad()
def time_sampling(model, batch: int, steps: int, autocast, device, repeats: int) -> dict:
    cfg = model.config
    text = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), device=device)
    image = torch.randint(0, cfg.codebook_size, (batch, cfg.num_codebooks, cfg.num_positions), device=device)
    labels = torch.randint(0, cfg.num_conditions, (batch,), device=device)
    out = {}
    for task in SAMPLE_TASKS:
        times = []
        for r in range(repeats + 1):  # the first run warms up kernels
            sync(device)
            began = time.perf_counter()
            with autocast():
                sample(model, task=task, labels=labels, text_ids=text, image_ids=image,
                       options=SamplerOptions(steps=steps), generator=None)
            sync(device)
            if r:
                times.append(time.perf_counter() - began)
        seconds = statistics.median(times)
        out[task] = {"seconds": seconds,
                     "images_per_s": batch / seconds if task != "image_to_text" else None,
                     "text_tokens_per_s": batch * cfg.text_len / seconds if task != "text_to_image" else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "B"])
    p.add_argument("--img-size", type=int, default=None, help="image side (grid = side/16); tiny 128, B 256")
    p.add_argument("--text-len", type=int, default=None, help="text budget (preset default: tiny 48, B 256)")
    p.add_argument("--text-vocab-size", type=int, default=30522, help="text vocabulary (BERT-sized by default)")
    p.add_argument("--batch", type=int, default=None, help="training batch (tiny 8, B 64)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (tiny 4, B 64)")
    p.add_argument("--sample-steps", type=int, nargs="+", default=None, help="unmasking steps (tiny 4, B 16 64)")
    p.add_argument("--iters", type=int, default=None, help="timed training steps (tiny 2, B 10)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timed sampling runs per setting")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/diffusion_<preset>_<device>.json)")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"
    img_size = args.img_size or (128 if tiny else 256)
    batch = args.batch or (8 if tiny else 64)
    sample_batch = args.sample_batch or (4 if tiny else 64)
    sample_steps = args.sample_steps or ([4] if tiny else [16, 64])
    iters = args.iters or (2 if tiny else 10)
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    overrides = dict(text_vocab_size=args.text_vocab_size, grid=(img_size // 16, img_size // 16),
                     condition_names=[f"m{i}" for i in range(6)], grad_checkpointing=args.grad_checkpointing)
    if args.text_len:
        overrides["text_len"] = args.text_len
    config = get_config(args.preset, **overrides)
    torch.manual_seed(0)
    model = JointDiffusionTransformer(config).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train = time_train(model, batch, iters, args.warmup, autocast, device)
    if device.type == "cuda":
        train["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    model.eval()
    sampling = {str(steps): time_sampling(model, sample_batch, steps, autocast, device, args.repeats)
                for steps in sample_steps}
    result = {"preset": args.preset, "img_size": img_size, "grid": list(config.grid), "text_len": config.text_len,
              "text_vocab_size": config.text_vocab_size, "parameters_m": model.num_parameters() / 1e6,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": dtype, "grad_checkpointing": args.grad_checkpointing,
              "train": train, "sample_batch": sample_batch, "sampling": sampling, "torch": torch.__version__}
    out = Path(args.out or Path(__file__).parent / "results" / f"diffusion_{args.preset}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset} ({result['parameters_m']:.1f} M params, {img_size}px, {dtype}) on {result['device']}: "
          f"train {train['samples_per_s']:.2f} samples/s at batch {batch}")
    for steps, tasks in sampling.items():
        print(f"  {steps} steps, batch {sample_batch}: text→image {tasks['text_to_image']['images_per_s']:.2f} images/s, "
              f"image→report {tasks['image_to_text']['text_tokens_per_s']:.0f} text tokens/s, "
              f"joint {tasks['joint']['images_per_s']:.2f} images/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
