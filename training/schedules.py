"""The one learning-rate schedule family of every trainer: linear warm-up, then cosine decay from the peak to a
floor (the tokenizer: docs/method.md §2; the diffusion model: floor 10 % of the peak; the AR generator: floor =
peak, i.e. constant after warm-up, the paper's recipe). A pure function of the step, so a resumed run needs no
scheduler state."""
from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, peak: float, floor: float, warmup_steps: int = 0) -> float:
    """lr at ``step`` (0-based): peak·(step+1)/warmup during warm-up, then
    floor + ½(peak − floor)(1 + cos(π·t)) with t going 0 → 1 over the remaining steps (exactly ``peak`` throughout
    when ``floor == peak``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if floor == peak:
        return peak
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup_steps: int) -> float:
    """0 → 1 linearly over ``warmup_steps`` (1 from the start when warmup_steps ≤ 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` at ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
