"""Learning-rate schedule of docs/method.md §2: linear warm-up, then cosine decay to a floor. A pure function of
the step, so a resumed run needs no scheduler state."""
import math
from dataclasses import dataclass


def cosine_lr(step: int, total_steps: int, peak: float, floor: float, warmup_steps: int = 0) -> float:
    """lr at ``step`` (0-based): peak·(step+1)/warmup during warm-up, then
    floor + ½(peak − floor)(1 + cos(π·t)) with t going 0 → 1 over the remaining steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup_steps: int) -> float:
    """0 → 1 linearly over ``warmup_steps`` (1 from the start when warmup_steps ≤ 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


@dataclass(frozen=True)
class Schedule:
    """Everything of a run that depends on the step: both learning rates and the discriminator's start
    and warm-up. Built once per run (``from_args``) and owned by the trainer."""
    total_steps: int
    warmup_steps: int
    disc_start: int
    disc_warmup: int
    lr: float
    lr_end: float
    disc_lr: float
    disc_lr_end: float

    @classmethod
    def from_args(cls, args, steps_per_epoch: int) -> "Schedule":
        return cls(total_steps=args.max_steps or math.ceil(args.epochs * steps_per_epoch),
                   warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                   disc_start=round(args.disc_start_epochs * steps_per_epoch),
                   disc_warmup=round(args.disc_warmup_epochs * steps_per_epoch),
                   lr=args.lr, lr_end=args.lr_end, disc_lr=args.disc_lr, disc_lr_end=args.disc_lr_end)

    def tokenizer_lr(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.lr, self.lr_end, self.warmup_steps)

    def disc_lr_at(self, step: int) -> float:
        return cosine_lr(max(step - self.disc_start, 0), max(self.total_steps - self.disc_start, 1), self.disc_lr,
                         self.disc_lr_end, 0)

    def disc_warmth(self, step: int) -> float:
        """The adversarial term's warm-up factor: 0 before the discriminator starts, then 0 → 1."""
        return linear_warmup(step - self.disc_start, self.disc_warmup) if step >= self.disc_start else 0.0
