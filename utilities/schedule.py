"""Learning-rate schedule of SPEC §2: linear warm-up, then cosine decay to a floor. A pure function of
the step, so a resumed run needs no scheduler state."""
import math


def cosine_lr(step: int, total_steps: int, peak: float, floor: float, warmup_steps: int = 0) -> float:
    """lr at ``step`` (0-based): peak·(step+1)/warmup during warm-up, then
    floor + ½(peak − floor)(1 + cos(π·t)) with t going 0 → 1 over the remaining steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))
