"""What a person sees during training: metrics.jsonl, a periodic log line, reconstruction grids
(input | reconstruction | error map), optional wandb, and loss curves at the end."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3]."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def error_map(inputs: torch.Tensor, recons: torch.Tensor, vmax: float = 0.5) -> np.ndarray:
    """Mean absolute error over channels (in [0, 1] units), coloured with 'magma' up to ``vmax`` →
    uint8 [B, H, W, 3]."""
    import matplotlib
    err = (inputs.detach().float() - recons.detach().float()).abs().mean(dim=1).div(2)  # [B, H, W] in [0, 1]
    cmap = matplotlib.colormaps["magma"]
    rgb = cmap((err / vmax).clamp(0, 1).cpu().numpy())[..., :3]
    return (rgb * 255).round().astype(np.uint8)


def save_reconstruction_grid(inputs: torch.Tensor, recons: torch.Tensor, path: Path,
                             title: Optional[str] = None, min_tile: int = 128) -> Path:
    """Save a PNG with one row per image: input | reconstruction | |error| (magma, 0 → 0.5).
    Tiles smaller than ``min_tile`` pixels are enlarged (nearest neighbour) so small images stay legible."""
    from PIL import Image, ImageDraw
    a, b, e = to_uint8(inputs), to_uint8(recons.clamp(-1, 1)), error_map(inputs, recons)
    rows = [np.concatenate([a[i], b[i], e[i]], axis=1) for i in range(a.shape[0])]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, -(-min_tile // a.shape[2]))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    header = 30 if title else 16
    canvas = Image.new("RGB", (grid.width, grid.height + header), "white")
    canvas.paste(grid, (0, header))
    w = a.shape[2] * scale
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(("input", "reconstruction", "|error| (0-0.5)")):
        draw.text((i * w + 4, header - 13), label, fill="black")
    if title:
        draw.text((4, 1), title, fill="gray")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (survives crashes line by line)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> List[Dict[str, float]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Throughput:
    """Images/s over the steps since the last call (wall clock, after device sync by the caller)."""

    def __init__(self):
        self.t = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.images / max(now - self.t, 1e-9)
        self.t, self.images = now, 0
        return r


def plot_loss_curves(metrics_path: Path, out_path: Path,
                     keys: Iterable[str] = ("loss/rec_l1", "loss/rec_l2", "loss/lpips", "loss/vq", "loss/contrast",
                                            "loss/g_adv", "loss/disc", "codebook_usage")) -> Optional[Path]:
    """One panel per logged quantity against the step; returns the PNG path (None if nothing logged)."""
    records = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in records)]
    if not records or not present:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(4, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
