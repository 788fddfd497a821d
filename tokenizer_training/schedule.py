"""The tokenizer's schedule (docs/method.md §2): both learning rates (``training.schedules.cosine_lr``, the
schedule family every trainer shares) and the discriminator's start and warm-up, as functions of the step."""
import math
from dataclasses import dataclass

from training.schedules import cosine_lr, linear_warmup

__all__ = ["Schedule", "cosine_lr", "linear_warmup"]


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
