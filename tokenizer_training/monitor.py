"""What a person sees during training: metrics.jsonl, a periodic log line, reconstruction grids
(input | reconstruction | error map), optional wandb, and loss curves at the end."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from training.metrics import read_metrics
from training.step_log import StepLog


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
                             title: Optional[str] = None, min_tile: int = 128,
                             row_labels: Optional[Sequence[str]] = None) -> Path:
    """Save a PNG with one row per image: input | reconstruction | |error| (magma, 0 → 0.5).
    Tiles smaller than ``min_tile`` pixels are enlarged (nearest neighbour) so small images stay legible.
    ``row_labels`` (one short text per row, e.g. file, modality, PSNR) are written in a margin on the left;
    without them the image is exactly as before."""
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
    if row_labels is not None:
        canvas = _with_row_labels(canvas, row_labels, header, a.shape[1] * scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _with_row_labels(canvas, labels: Sequence[str], header: int, row_height: int):
    """``canvas`` with a white margin on the left holding ``labels[i]`` beside row i (rows of ``row_height``
    pixels below a ``header``)."""
    from PIL import Image, ImageDraw
    measure = ImageDraw.Draw(canvas)
    margin = 8 + int(max((measure.textlength(str(t)) for t in labels), default=0))
    labelled = Image.new("RGB", (canvas.width + margin, canvas.height), "white")
    labelled.paste(canvas, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for i, text in enumerate(labels):
        draw.text((4, header + i * row_height + row_height // 2 - 5), str(text), fill="black")
    return labelled


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


def plot_loss_curves(metrics_path: Path, out_path: Path, keys: Optional[Iterable[str]] = None,
                     title: Optional[str] = None) -> Optional[Path]:
    """One panel per logged quantity against the step; returns the PNG path (None if nothing logged).
    ``keys`` None: every ``loss/*`` key in the log, then the adaptive weight, codebook usage, gradient norm, lr."""
    records = read_metrics(metrics_path)
    if keys is None:
        seen = list(dict.fromkeys(k for r in records for k in r))
        keys = [k for k in seen if k.startswith("loss/")] + [k for k in ("adv_weight", "codebook_usage", "grad_norm",
                                                                      "lr") if k in seen]
    present = [k for k in keys if any(k in r for r in records)]
    if not records or not present:
        return None
    from matplotlib.figure import Figure  # a bare Figure: no backend switch, so notebooks keep inline display
    cols = min(4, len(present))
    rows = math.ceil(len(present) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, marker="." if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel("% of codewords used" if key == "codebook_usage" else key.split("/")[-1])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return Path(out_path)


def short_name(key: str) -> str:
    return key.split("/", 1)[1] if key.startswith("loss/") else key


class StepLogger:
    """Everything a person sees of the steps: a console line and a ``metrics.jsonl`` record every
    ``log_every`` steps (whatever values the step returned, reduced over ranks with one collective and one
    host sync), wandb when asked, a progress bar on terminals, and the loss curves at the end."""

    def __init__(self, args, run_dir: Path, total_steps: int, start_step: int, flops_per_image: float,
                 peak_flops: float, device: torch.device, is_main: bool, world: int,
                 where_to_resume: Callable[[], str] = lambda: ""):
        self.args, self.run_dir, self.total, self.device = args, Path(run_dir), total_steps, device
        self.where_to_resume = where_to_resume  # for the message when training goes non-finite
        self.skipped = 0
        self.flops_per_image, self.peak_flops, self.is_main, self.world = flops_per_image, peak_flops, is_main, world
        # metrics.jsonl (rows after the checkpoint we resume from are redone: dropped), console, progress, wandb
        self.log = StepLog(self.run_dir, total_steps, start_step, enabled=is_main, desc=f"stage {args.stage}",
                           wandb_project=args.wandb_project if args.report_wandb else None,
                           wandb_config=args.to_dict())
        self.throughput = Throughput()
        self.t_start, self.step_start = time.perf_counter(), start_step

    def print(self, msg: str) -> None:
        self.log.print(msg)

    def after_step(self, step: int, logs: Dict[str, torch.Tensor], batches, lr: float, epoch: int,
                   bad_samples: int) -> Optional[Dict[str, float]]:
        """Count the step's images; on logging steps (and the last) reduce, check, record and print. Returns the
        reduced values on logging steps (all finite), else None."""
        from training import distributed as dist
        self.throughput.add(sum(b["image"].shape[0] for b in batches) * self.world)
        self.log.advance()
        if step % self.args.log_every and step != self.total:
            return None
        keys = list(logs)
        values = dict(zip(keys, dist.all_reduce_mean(torch.stack([logs[k].float() for k in keys])).tolist()))
        self._check_finite(step, values)
        rate = self.throughput.rate()
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / max(step - self.step_start, 1) * (self.total - step)
        record = {"step": step, "epoch": epoch, "lr": lr, "images_per_s": rate,
                  "tokenizer_tflops": self.flops_per_image * rate / 1e12, "bad_samples": bad_samples, **values}
        if self.peak_flops:
            record["mfu"] = self.flops_per_image * rate / self.peak_flops
        if self.device.type == "cuda":
            record["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1024 ** 3
        losses = " ".join(f"{short_name(k)} {v:.4g}" for k, v in values.items()
                          if k.startswith("loss/") and k != "loss/total")
        others = (f"usage {values['codebook_usage']:.1f}% " if "codebook_usage" in values else "") + f"lr {lr:.2e}"
        speed = (f"{rate:.1f} img/s" + (f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
                 + (f" mem {record['gpu_peak_memory_gb']:.1f}G" if "gpu_peak_memory_gb" in record else ""))
        line = (f"step {step}/{self.total} ep {epoch} | total {values['loss/total']:.4f} {losses} | {others} | "
                f"{speed} ETA {format_eta(eta)}")
        self.log.write(record, line)
        return values

    def _check_finite(self, step: int, values: Dict[str, float]) -> None:
        """Stop on a non-finite step since the last check (every step is counted on the device), or, with
        ``--on-nonfinite skip``, report the skipped steps and stop after too many in a row."""
        nonfinite = values.pop("nonfinite_steps", 0.0)
        consecutive = values.pop("nonfinite_consecutive", 0.0)
        bad = nonfinite > 0 or not all(math.isfinite(v) for v in values.values())
        if self.args.on_nonfinite == "skip" and consecutive <= self.args.max_nonfinite_skips:
            if nonfinite > self.skipped:
                self.print(f"[train] warning: {nonfinite - self.skipped:.0f} non-finite step(s) skipped before step "
                           f"{step} ({nonfinite:.0f} in all)")
                self.skipped = nonfinite
            return
        if bad:
            where = "; " + self.where_to_resume() if self.where_to_resume() else ""
            raise FloatingPointError(f"non-finite loss or gradient by step {step}: "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                                     + (f" ({consecutive:.0f} non-finite steps in a row)" if consecutive else "")
                                     + f"{where}. Lower --lr, check the data, or use --on-nonfinite skip.")

    def close(self) -> None:
        self.log.close()

    def finish(self, step: int) -> Optional[Path]:
        """Loss curves (main process); returns their path."""
        if not self.is_main:
            return None
        curves = plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curves.png",
                                  title=f"{self.run_dir.name}: stage {self.args.stage}, {step} steps")
        self.print(f"[train] done: {step} steps in {format_eta(time.perf_counter() - self.t_start)}; curves → {curves}")
        return curves


class ReconstructionGrids:
    """input | reconstruction | error grids of a fixed set of images every ``vis_every`` steps and at the
    end (main process only); the images come from ``TrainingData.grid_images``."""

    def __init__(self, args, run_dir: Path, data, trainer, is_main: bool):
        self.every, self.run_dir, self.data, self.trainer = args.vis_every, Path(run_dir), data, trainer
        self.enabled = is_main and self.every > 0
        self.images: Optional[torch.Tensor] = None
        self.labels: Optional[List[str]] = None

    def maybe_save(self, step: int, total: int) -> Optional[Path]:
        if not self.enabled or (step % self.every and step != total):
            return None
        if self.images is None:
            found = self.data.grid_images()
            if found is None:
                return None
            images, self.labels = found
            self.images = images.to(self.trainer.device)
        tokenizer = self.trainer.tokenizer
        tokenizer.eval()
        with torch.no_grad(), self.trainer.autocast():
            recon = tokenizer.img_to_reconstructed_img(self.images)
        tokenizer.train()
        return save_reconstruction_grid(self.images, recon, self.run_dir / "vis" / f"step{step:08d}.png", f"step {step}",
                                        row_labels=self.labels)
