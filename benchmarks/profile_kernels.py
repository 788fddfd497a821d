"""Where does the time go? A torch.profiler breakdown of one workload, by operator and by tokenizer part.

Workloads: ``tokenize`` / ``reconstruct`` (inference, the token API) and ``train`` (the tokenizer's own
forward + backward with L1/L2/VQ, no loss networks). Each is run ``--warmup`` times, then profiled over
``--iters`` calls; the output lists the operators with the most self time on the device (CUDA kernels on a
GPU, CPU time otherwise) and the time inside each top-level part of the model (encoder conv front, encoder
ViT, bottleneck, decoder ViT, decoder conv stages), from ``record_function`` ranges put around them.

    python benchmarks/profile_kernels.py --preset large --workload tokenize --batch 64 --device cuda --out prof_tok.json
    python benchmarks/profile_kernels.py --preset tiny --img-size 64 --batch 2 --device cpu --iters 1   # CPU smoke

Writes JSON (``--out``) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import meditok

PARTS = {  # attribute path → label
    "encoder.patch_embed": "encoder conv front", "encoder.blocks": "encoder ViT", "quant_proj": "bottleneck (in)",
    "quantizer": "quantizer", "post_quant_proj": "bottleneck (out)", "decoder.blocks": "decoder ViT",
    "decoder.up_conv1": "decoder up_conv1", "decoder.up_conv2": "decoder up_conv2", "decoder.up_conv3": "decoder up_conv3",
    "decoder.up_conv4": "decoder up_conv4 (inverse stem)",
}


def label_parts(model: torch.nn.Module) -> list:
    """Wrap the forward of each part in a record_function range named 'part: <label>' (forward only)."""
    handles = []
    for path, label in PARTS.items():
        module = model.get_submodule(path)
        # the model iterates over its Sequential stacks instead of calling them: open the range at the
        # first member's call and close it after the last one's
        first, last = (module[0], module[-1]) if isinstance(module, torch.nn.Sequential) else (module, module)
        state = {"name": f"part: {label}"}

        def pre(_m, _inp, state=state):
            state["ctx"] = record_function(state["name"])
            state["ctx"].__enter__()

        def post(_m, _inp, _out, state=state):
            state.pop("ctx").__exit__(None, None, None)

        handles += [first.register_forward_pre_hook(pre), last.register_forward_hook(post)]
    return handles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large")
    p.add_argument("--workload", choices=("tokenize", "reconstruct", "train"), default="tokenize")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = meditok.build_meditok(a.preset, device=device, img_size=a.img_size)
    model.speed_up(channels_last=a.channels_last)
    x = torch.rand(a.batch, 3, a.img_size, a.img_size, device=device) * 2 - 1
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if a.dtype == "bf16" else contextlib.nullcontext()

    def run():
        if a.workload == "train":
            with cast:
                out = model.train()(x)
                loss = 0.2 * F.l1_loss(out["reconstruction"], x) + F.mse_loss(out["reconstruction"], x) + out["vq_loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)
            return
        with torch.inference_mode(), cast:
            model.eval()
            model.img_to_idx(x) if a.workload == "tokenize" else model.img_to_reconstructed_img(x)

    for _ in range(a.warmup):
        run()
    on_gpu = device.type == "cuda"
    handles = label_parts(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(a.iters):
            run()
        if on_gpu:
            torch.cuda.synchronize()
    for h in handles:
        h.remove()

    time_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    ops = [e for e in events if not e.key.startswith("part: ")]
    total = sum(getattr(e, time_key) for e in ops) or 1.0
    top = sorted(ops, key=lambda e: getattr(e, time_key), reverse=True)[:a.top]
    parts = [e for e in events if e.key.startswith("part: ")]
    part_key = "device_time_total" if on_gpu else "cpu_time_total"
    per_iter_ms = lambda us: us / 1e3 / a.iters  # noqa: E731
    result = {
        "preset": a.preset, "workload": a.workload, "batch": a.batch, "img_size": a.img_size, "dtype": a.dtype,
        "channels_last": a.channels_last, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "total_ms_per_iter": per_iter_ms(total),
        "ops": [{"op": e.key, "ms_per_iter": per_iter_ms(getattr(e, time_key)),
                 "share": getattr(e, time_key) / total, "calls_per_iter": e.count / a.iters} for e in top],
        # forward ranges only (backward kernels run outside them)
        "parts_forward": [{"part": e.key[len("part: "):], "ms_per_iter": per_iter_ms(getattr(e, part_key))}
                          for e in sorted(parts, key=lambda e: getattr(e, part_key), reverse=True)],
    }
    lines = [f"## {a.workload}, {a.preset}, batch {a.batch} × {a.img_size} px, {a.dtype}"
             f"{', channels-last' if a.channels_last else ''} — {result['device']}: "
             f"{result['total_ms_per_iter']:.1f} ms per call", "",
             "| part (forward) | ms |", "|---|---|"]
    lines += [f"| {r['part']} | {r['ms_per_iter']:.2f} |" for r in result["parts_forward"]]
    lines += ["", "| op | ms | share | calls |", "|---|---|---|---|"]
    lines += [f"| {r['op'][:70]} | {r['ms_per_iter']:.2f} | {r['share']:.1%} | {r['calls_per_iter']:.0f} |"
              for r in result["ops"]]
    print("\n".join(lines))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
        Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
