"""Is bf16 safe? Two checks, written as JSON.

1. Tokenization: the share of token ids that bf16 autocast gives identically to fp32, over a CSV of
   images (default: the example set), for a given checkpoint. The bottleneck runs in fp32 in both cases,
   so only the encoder's rounding can move a latent across a codeword boundary.
2. Training: the losses of the first --steps steps of two runs with the same seed and data, fp32 vs bf16
   autocast, and their largest relative gap per loss term.

    python benchmarks/bf16_numerics.py --checkpoint runs/stage2_tiny/tokenizer --device cpu
    python benchmarks/bf16_numerics.py --checkpoint weights/meditok_simple_v1.pth --device cuda --train-config stage1_large_h100
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import meditok


def token_agreement(checkpoint: str, csv_path: str, root: str, device: torch.device, img_size=None) -> dict:
    from meditok.data import CSVImageDataset, eval_transform
    model = meditok.load_meditok(checkpoint, device=device)
    size = img_size or model.config.img_size
    ds = CSVImageDataset(csv_path, root=root, transform=eval_transform(size))
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)
    with torch.no_grad():
        ids32 = model.img_to_idx(images)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ids16 = model.img_to_idx(images)
    same = (ids32 == ids16).float()
    return {"checkpoint": str(checkpoint), "images": len(ds), "img_size": size, "tokens": ids32.numel(),
            "agreement": float(same.mean()), "images_fully_identical": int(same.flatten(1).all(dim=1).sum())}


def training_gap(flags: list, steps: int) -> dict:
    """Run train.py twice (fp32, bf16) in temp folders with the same seed; compare logged losses per step."""
    import subprocess
    import tempfile
    curves = {}
    train_py = Path(__file__).resolve().parents[1] / "train.py"
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, str(train_py), *flags, "--precision", precision, "--max-steps", str(steps),
                            "--log-every", "1", "--vis-every", "0", "--save-every", str(steps + 1), "--output-dir", tmp],
                           check=True, cwd=train_py.parent)
            curves[precision] = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    keys = ["loss/rec_l1", "loss/rec_l2", "loss/lpips", "loss/vq", "loss/contrast", "loss/total"]
    gaps = {}
    for k in keys:
        rel = [abs(a[k] - b[k]) / max(abs(a[k]), 1e-8) for a, b in zip(curves["fp32"], curves["bf16"]) if k in a]
        gaps[k] = max(rel) if rel else None
    return {"steps": steps, "max_relative_gap": gaps,
            "fp32": [{k: r[k] for k in keys} for r in curves["fp32"]],
            "bf16": [{k: r[k] for k in keys} for r in curves["bf16"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="tokenizer to check (any source load_meditok reads)")
    p.add_argument("--csv", default="datasets/meta/examples_val.csv")
    p.add_argument("--root", default="datasets/examples")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="training steps compared (0: skip the training check)")
    p.add_argument("--train-config", default="stage1_tiny_cpu", help="config of the compared training runs")
    p.add_argument("--out", default="outputs/bf16_numerics.json")
    a = p.parse_args()
    device = torch.device(a.device)
    report = {"tokenization": token_agreement(a.checkpoint, a.csv, a.root, device, a.img_size)}
    print(json.dumps(report["tokenization"]))
    if a.steps:
        flags = ["--config", a.train_config, "--device", a.device, "--deterministic", "--num-workers", "0"]
        report["training"] = training_gap(flags, a.steps)
        print(json.dumps(report["training"]["max_relative_gap"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
