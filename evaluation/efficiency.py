"""Efficiency of a tokenizer, as in the paper's Table S4: peak memory and images/s.

For each task (tokenize = encode + quantise to ids; decode = ids → image; reconstruct = both), each
precision (fp32; bf16 autocast, the bottleneck staying fp32) and each (batch, resolution) setting, it
times ``--iters`` calls after ``--warmup`` calls, synchronising the device around each, and records
images/s, per-call latency percentiles, peak memory (GPU: ``torch.cuda.max_memory_allocated``, weights
included; CPU: not measured) and achieved TFLOP/s from FLOPs counted by ``torch.utils.flop_counter``.

    python -m evaluation.efficiency --preset large --device cuda            # Table S4 settings
    python -m evaluation.efficiency --preset tiny --settings 4x64 --iters 2  # quick CPU check
    python -m evaluation.efficiency --dtypes bf16 --settings 64x256 --variants baseline channels_last cuda_graphs

Writes ``efficiency.json``, ``efficiency.md`` and ``efficiency.csv`` to ``--out``. Weights do not change
the timings, so a randomly initialised preset is used unless ``--checkpoint`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import meditok
from evaluation import report
from meditok.info import forward_flops

TASKS = ("tokenize", "decode", "reconstruct")
# Table S4 settings: (batch, resolution)
PAPER_SETTINGS = ("16x256", "8x512")
PAPER_TABLE_S4 = {"16x256": {"memory_gb": 4.69, "images_per_s": 92.81}, "8x512": {"memory_gb": 6.75, "images_per_s": 20.63}}


def _parse_setting(text: str) -> tuple:
    try:
        batch, size = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r} must look like BATCHxSIZE, e.g. 16x256") from None
    if size % 16:
        raise argparse.ArgumentTypeError(f"resolution {size} in {text!r} is not a multiple of 16")
    return batch, size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def measure(model: meditok.MedITok, task: str, dtype: str, batch: int, size: int, device: torch.device,
            warmup: int, iters: int, keep_output: Optional[dict] = None) -> Dict[str, object]:
    """Time one (task, precision, batch, size) cell; returns a flat record. The warm-up calls (where compilation
    and CUDA-graph capture happen) are timed apart (``warmup_s``). The inputs are the same for every call with
    equal (batch, size), so runs of different variants can be compared; when ``keep_output`` is a dict, the last
    call's output is stored in it under ``"output"``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    grid = model.config.token_grid(size)
    ids = torch.randint(0, model.config.codebook_size, (batch, model.config.num_codebooks, grid[0] * grid[1]),
                        generator=gen).to(device)
    call = {
        "tokenize": lambda: model.img_to_idx(images),
        "decode": lambda: model.idx_to_img(ids),
        "reconstruct": lambda: model.img_to_reconstructed_img(images),
    }[task]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, warm = [], []
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range(warmup + iters):
            _sync(device)
            t0 = time.perf_counter()
            out = call()
            _sync(device)
            (times if i >= warmup else warm).append(time.perf_counter() - t0)
    if keep_output is not None:
        keep_output["output"] = out
    total = sum(times)
    flops = forward_flops(model, size)
    per_image = {"tokenize": flops["encode"], "decode": flops["decode"],
                 "reconstruct": flops["encode"] + flops["decode"]}[task]
    images_per_s = batch * iters / total
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {
        "task": task, "dtype": dtype, "batch": batch, "img_size": size,
        "images_per_s": images_per_s,
        "latency_ms_p50": statistics.median(times) * 1e3, "latency_ms_p90": q[8] * 1e3, "warmup_s": sum(warm),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else None,
        "gflops_per_image": per_image / 1e9,
        "achieved_tflops": per_image * images_per_s / 1e12,
    }


#: named speed variants (``MedITok.speed_up`` keyword arguments) that ``--variants`` times one after another
VARIANTS: Dict[str, Dict[str, object]] = {
    "baseline": {},
    "channels_last": {"channels_last": True},
    "upsample_direct": {"upsample": "direct"},
    "channels_last_direct": {"channels_last": True, "upsample": "direct"},
    "fused_norm": {"channels_last": True, "fused_norm": True},
    "score_chunk": {"score_chunk": 8192},
    "cuda_graphs": {"cuda_graphs": True},
    "cuda_graphs_cl_fused": {"cuda_graphs": True, "channels_last": True, "fused_norm": True},
    "regional_compile": {"compile": "regional"},
    "regional_compile_cl": {"compile": "regional", "channels_last": True},
    "whole_compile": {"compile": "whole"},
}


def compare_outputs(task: str, reference: torch.Tensor, output: torch.Tensor) -> Dict[str, float]:
    """Numerics of a variant against the baseline on the same inputs: % of equal token ids (tokenize), or
    the largest and mean absolute difference of the images in [-1, 1] (decode / reconstruct)."""
    if task == "tokenize":
        return {"ids_agree_pct": float((reference == output).double().mean() * 100)}
    diff = (reference.float() - output.float()).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def shutdown_compile_workers() -> None:
    """Stop inductor's compile worker pool now instead of at interpreter exit.

    ``torch.compile`` with inductor compiles generated kernels in a pool of subprocesses
    (``torch._inductor.async_compile``, ``TORCHINDUCTOR_COMPILE_THREADS`` workers, started at the first compile
    and warmed in the background). It is shut down by an ``atexit`` hook, which waits for the workers; a worker
    still busy or stuck (a pending warm-up compile, a wedged pipe) keeps the process alive after its results are
    written — what a compiled benchmark run was seen doing. Shutting it down explicitly, right after the last
    compiled call, makes that wait part of the run (and a hang visible where it happens);
    ``TORCHINDUCTOR_COMPILE_THREADS=1`` avoids the pool altogether (compiles in-process, slower)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers as shutdown
    except ImportError:  # pragma: no cover - older torch
        return
    shutdown()


def environment(device: torch.device) -> Dict[str, object]:
    return {**report.environment(device), "tf32": torch.backends.cuda.matmul.allow_tf32}


def to_markdown(records: List[Dict[str, object]], env: Dict[str, object], preset: str) -> str:
    lines = [f"# Efficiency — MedITok `{preset}` on {env.get('gpu', env['device'])}", "",
             f"torch {env['torch']}; timed after warm-up with device synchronisation; peak memory = "
             f"`torch.cuda.max_memory_allocated` (weights included). Paper Table S4 (GPU not named): "
             f"4.69 GB / 92.81 img/s at 16×256, 6.75 GB / 20.63 img/s at 8×512 (reconstruction).", "",
             "| task | precision | batch | px | images/s | p50 ms | peak GB | TFLOP/s | warm-up s | variant | numerics vs "
             "first variant |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mem = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "–"
        num = (f"ids {r['ids_agree_pct']:.2f} %" if "ids_agree_pct" in r else
               f"max |Δ| {r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "–")
        lines.append(f"| {r['task']} | {r['dtype']} | {r['batch']} | {r['img_size']} | {r['images_per_s']:.1f} | "
                     f"{r['latency_ms_p50']:.1f} | {mem} | {r['achieved_tflops']:.1f} | {r['warmup_s']:.1f} | "
                     f"{r.get('variant', 'run')} | {num} |")
    return "\n".join(lines) + "\n"


def flop_text(flops: float) -> str:
    """1.46e15 → '1.46 PFLOP' (three significant digits, SI prefix)."""
    for scale, name in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return f"{flops / scale:.3g} {name}"
    return f"{flops / 1e6:.3g} MFLOP"


def announce_device(device: torch.device, preset: Optional[str], settings: List[tuple], tasks: List[str],
                    dtypes: List[str], calls_per_cell: int) -> None:
    """Say which device was chosen; on a CPU, also how much work the grid is and a lower bound on its run time
    (FLOPs counted as in the records, divided by this CPU's own fp32 matmul rate, timed here in a fraction of a
    second; real convolutions and attention run slower than a plain matmul)."""
    if device.type == "cuda":
        print(f"device: {device} ({torch.cuda.get_device_name(device)})", flush=True)
        return
    print(f"device: {device} (no CUDA GPU found or chosen; pass --device cuda on a GPU machine)", flush=True)
    if preset is None:  # a checkpoint's preset is known only once it is loaded
        return
    flops_of_size = {s: forward_flops(meditok.build_meditok(preset, empty=True), s) for _, s in settings}
    per_image = {"tokenize": lambda f: f["encode"], "decode": lambda f: f["decode"],
                 "reconstruct": lambda f: f["encode"] + f["decode"]}
    total = sum(b * calls_per_cell * per_image[t](flops_of_size[s]) for b, s in settings for t in tasks) * len(dtypes)
    a = torch.randn(512, 512)
    torch.mm(a, a)
    start = time.perf_counter()
    for _ in range(5):
        torch.mm(a, a)
    rate = 5 * 2 * 512 ** 3 / (time.perf_counter() - start)
    minutes = total / rate / 60
    duration = f"{minutes / 60:.1f} h" if minutes > 120 else f"{minutes:.1f} min"
    print(f"warning: running the {preset!r} grid on the CPU: {len(settings) * len(tasks) * len(dtypes)} cells, "
          f"{flop_text(total)} in all; at this CPU's matmul rate ({rate / 1e9:.0f} GFLOP/s) that is at least "
          f"{duration}. For a quick check: --preset tiny --settings 4x64 --iters 2.", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="large", help="model preset (default: large)")
    parser.add_argument("--checkpoint", default=None, help="optional weights (any source load_meditok accepts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", type=_parse_setting, default=[_parse_setting(s) for s in PAPER_SETTINGS],
                        metavar="BATCHxSIZE", help="batch × resolution cells (default: Table S4's 16x256 8x512)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per cell (default 10)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32 cells (off by default)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (MedITok.speed_up)")
    parser.add_argument("--compile", nargs="?", const="whole", default=None, choices=("whole", "regional"),
                        help="torch.compile (MedITok.speed_up): 'whole' (the flag alone) = encoder and decoder as one "
                        "graph each, 'regional' = each repeated block on its own; raise --warmup: each new shape "
                        "compiles first (warm-up time is reported apart, warmup_s)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; aot_eager traces without generating kernels)")
    parser.add_argument("--upsample", choices=("transposed", "direct"), default=None,
                        help="decoder ×2 upsampling form (default: the model's, transposed); same parameters")
    parser.add_argument("--fused-norm", action="store_true",
                        help="LayerNorm2d(+GELU) as one Triton kernel on channels-last maps (CUDA; with --channels-last)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay tokenize/reconstruct from CUDA graphs captured per input shape (CUDA only)")
    parser.add_argument("--score-chunk", type=int, default=None,
                        help="quantizer: score this many tokens at once (less peak memory; same ids)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="time these named variants one after another on models with the same weights, and "
                        "compare each one's outputs with the first's on the same inputs (ids agreement, image "
                        "differences); the single-variant flags above are then ignored")
    parser.add_argument("--out", default="outputs/efficiency", help="output folder (default outputs/efficiency)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    announce_device(device, None if args.checkpoint else args.preset, args.settings, args.tasks, args.dtypes,
                    args.warmup + args.iters)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    single = {"channels_last": args.channels_last, "compile": args.compile or False, "upsample": args.upsample,
              "fused_norm": args.fused_norm, "cuda_graphs": args.cuda_graphs, "score_chunk": args.score_chunk}
    variants = {name: VARIANTS[name] for name in args.variants} if args.variants else {"run": single}
    out = Path(args.out)
    env = {**environment(device), "channels_last": args.channels_last, "compile": bool(args.compile),
           "compile_form": args.compile, "compile_backend": args.compile_backend if args.compile else None,
           "variants": variants if args.variants else None}

    def save(records: List[Dict[str, object]], final: bool) -> str:
        """Write the outputs; also after each variant, so a run cut short keeps what it finished."""
        ok = [r for r in records if "error" not in r]
        markdown = to_markdown(ok, env, args.preset if not args.checkpoint else "checkpoint")
        report.write_outputs(out, "efficiency", {"preset": args.preset, "environment": {**env, "finished_at": time.time(),
                                                                                         "complete": final},
                                                 "paper_table_s4": PAPER_TABLE_S4, "records": records},
                             markdown, {"": ok})
        return markdown

    try:
        records = run_variants(args, device, variants, on_variant=lambda recs: save(recs, final=False))
    finally:
        shutdown_compile_workers()
    print(save(records, final=True))
    print(f"wrote {out / 'efficiency.json'}, .md and .csv", flush=True)
    return 0


def _build(args, device: torch.device, state: Optional[dict]) -> meditok.MedITok:
    if args.checkpoint:
        return meditok.load_meditok(args.checkpoint, device=device)
    torch.manual_seed(0)
    model = meditok.build_meditok(args.preset, device=device)
    if state is not None:
        model.load_state_dict(state)
    return model


def run_variants(args, device: torch.device, variants: Dict[str, Dict[str, object]],
                 on_variant=None) -> List[Dict[str, object]]:
    """Every (variant, cell) record; with several variants, each record also carries its numerics against the
    first variant's output on the same inputs."""
    cells = [(t, d, b, s) for (b, s) in args.settings for d in args.dtypes for t in args.tasks]
    try:
        from tqdm import tqdm

        from evaluation.progress import progress_options
    except ImportError:  # pragma: no cover
        tqdm = None
    records, reference, state = [], {}, None
    for v, (name, options) in enumerate(variants.items()):
        model = _build(args, device, state)
        if state is None and len(variants) > 1:
            state = {k: t.clone() for k, t in model.state_dict().items()}
        options = dict(options)
        if options.get("compile"):
            options["backend"] = args.compile_backend
        model.eval().speed_up(**options)
        for task, dtype, batch, size in (tqdm(cells, desc=f"efficiency {name}", unit="cell", **progress_options())
                                         if tqdm else cells):
            kept: Dict[str, torch.Tensor] = {}
            try:
                rec = measure(model, task, dtype, batch, size, device, args.warmup, args.iters, keep_output=kept)
            except torch.cuda.OutOfMemoryError:
                rec = {"task": task, "dtype": dtype, "batch": batch, "img_size": size, "error": "out of memory"}
                torch.cuda.empty_cache()
            rec["variant"] = name
            key = (task, dtype, batch, size)
            if "output" in kept and len(variants) > 1:
                if v == 0:
                    reference[key] = kept["output"].to("cpu")
                elif key in reference:
                    rec.update(compare_outputs(task, reference[key], kept["output"].to("cpu")))
            records.append(rec)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_variant is not None and v < len(variants) - 1:
            on_variant(records)
    return records


if __name__ == "__main__":
    sys.exit(main())
