"""Absorbing-state (masked) diffusion: noise schedules, the forward masking process for the text and
image parts, and the ELBO-weighted loss (MDLM, Sahoo et al. 2024; UniDisc, Swerdlow et al. 2025).

Time t ∈ [0, 1]; α(t) is the probability that a token is still clean, so a token is masked with
probability m(t) = 1 − α(t), independently per token (per image *position*: its 8 codes together).

    log-linear  α(t) = 1 − (1 − ε)·t                 m(t) = (1 − ε)·t       w(t) = 1 / t
    cosine      α(t) = cos(π t / 2)                  m(t) = 1 − cos(π t / 2)  w(t) = (π/2)·sin(πt/2) / (1 − cos(πt/2))

with the continuous-time NELBO weight w(t) = −α'(t) / (1 − α(t)). The cosine forms are evaluated as
m(t) = 2·sin²(πt/4), α(t) = sin(π(1 − t)/2) and w(t) = (π/2)·cos(πt/4) / sin(πt/4): the same functions,
without the cancellation of 1 − cos near 0 that cost float32 ~1.5 % at t = 1e-3. The loss of one part
(text or image) of one sample is

    L = w(t) · (1 / L_part) · Σ_{masked positions l} Σ_codes −log p_θ(x₀[l] | x_t)

(L_part = number of positions of the part; for the image the sum also runs over the 8 codebooks and
is divided by 8 as well), averaged over the samples whose part was noised. The full objective is
L_image + λ_text · L_text.

Task mixing: each sample draws one task — joint (both parts noised, independent t's), image|text
(text clean, t_text = 0) or text|image (image clean, t_image = 0) — so one batch trains all three.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

SCHEDULES = ("loglinear", "cosine")
TASKS = ("joint", "image_given_text", "text_given_image")


@dataclass
class MaskSchedule:
    """Noise schedule α(t); ``eps`` keeps the log-linear α(1) = ε > 0 as in MDLM."""

    name: str = "loglinear"
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown mask schedule {self.name!r}; choose one of {SCHEDULES}")

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """m(t) = 1 − α(t), the probability that a token is masked at time t ([B] → [B], in [0, 1])."""
        if self.name == "loglinear":
            return (1.0 - self.eps) * t
        # 1 − cos(x) = 2·sin²(x/2): subtracting cos(πt/2) ≈ 1 from 1 in float32 leaves few significant
        # bits for small t (m(1e-3) was 1.5 % off); the sine form keeps full relative precision.
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "loglinear":
            return 1.0 - self.mask_prob(t)
        # cos(πt/2) = sin(π(1 − t)/2): 1 − t is exact in floating point for t in [½, 1], and the sine of a
        # small argument keeps relative precision where α → 0 (1 − m(t) would cancel there instead).
        return torch.sin(0.5 * math.pi * (1.0 - t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight w(t) = −α'(t) / (1 − α(t)) ([B] → [B], positive)."""
        if self.name == "loglinear":
            return 1.0 / t
        # (π/2)·sin(πt/2) / (1 − cos(πt/2)) with sin(2y) = 2 sin y cos y and 1 − cos(2y) = 2 sin²y, y = πt/4:
        # = (π/2)·cos(y) / sin(y), free of the 1 − cos cancellation (w(1e-3) was 1971 instead of 2000).
        quarter = 0.25 * math.pi * t
        return 0.5 * math.pi * torch.cos(quarter) / torch.sin(quarter)


@dataclass
class TaskMix:
    """Probabilities of the three training tasks (normalised on use)."""

    joint: float = 1.0
    image_given_text: float = 1.0
    text_given_image: float = 1.0

    def probs(self) -> torch.Tensor:
        p = torch.tensor([self.joint, self.image_given_text, self.text_given_image], dtype=torch.float64)
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"task mix {p.tolist()} must be non-negative with a positive sum")
        return p / p.sum()


@dataclass
class NoisedBatch:
    """A batch after forward masking. Shapes: text [B, Lt], image [B, 8, N]; masks are bool [B, Lt] /
    [B, N]; t's are [B] in [0, 1] (0 = that part is clean); task [B] indexes TASKS."""

    text_ids: torch.Tensor
    image_ids: torch.Tensor
    text_mask: torch.Tensor
    image_mask: torch.Tensor
    t_text: torch.Tensor
    t_image: torch.Tensor
    task: torch.Tensor


def sample_times(batch: int, t_min: float, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """t ~ U[t_min, 1] by stratified (low-discrepancy) sampling as in MDLM: one t per stratum of [0, 1)."""
    u = (torch.rand(1, generator=generator).item() + torch.arange(batch, dtype=torch.float64)) / batch
    u = u[torch.randperm(batch, generator=generator)]
    return (t_min + (1.0 - t_min) * u).float().to(device)


def draw_tasks(batch: int, mix: TaskMix, generator: Optional[torch.Generator], device) -> torch.Tensor:
    return torch.multinomial(mix.probs(), batch, replacement=True, generator=generator).to(device)


def forward_mask(text_ids: torch.Tensor, image_ids: torch.Tensor, schedule: MaskSchedule, *,
                 text_mask_id: int, image_mask_id: int, mix: TaskMix = TaskMix(), t_min: float = 1e-3,
                 generator: Optional[torch.Generator] = None, task: Optional[torch.Tensor] = None,
                 t_text: Optional[torch.Tensor] = None, t_image: Optional[torch.Tensor] = None) -> NoisedBatch:
    """Clean ids → masked ids with separate mask draws for text and image.

    text_ids [B, Lt] in [0, V), image_ids [B, 8, N] in [0, K). ``task``/``t_text``/``t_image`` may be given
    (tests); otherwise tasks come from ``mix`` and times from :func:`sample_times`. Random draws use
    ``generator`` (CPU) so a run is reproducible from its seed.
    """
    b, device = text_ids.shape[0], text_ids.device
    if task is None:
        task = draw_tasks(b, mix, generator, device)
    if t_text is None:
        t_text = sample_times(b, t_min, generator, device)
    if t_image is None:
        t_image = sample_times(b, t_min, generator, device)
    t_text = torch.where(task == TASKS.index("image_given_text"), torch.zeros_like(t_text), t_text)
    t_image = torch.where(task == TASKS.index("text_given_image"), torch.zeros_like(t_image), t_image)
    u_text = torch.rand(text_ids.shape, generator=generator).to(device)
    u_image = torch.rand(image_ids.shape[0], image_ids.shape[2], generator=generator).to(device)
    text_mask = u_text < schedule.mask_prob(t_text)[:, None]
    image_mask = u_image < schedule.mask_prob(t_image)[:, None]
    return NoisedBatch(
        text_ids=text_ids.masked_fill(text_mask, text_mask_id),
        image_ids=image_ids.masked_fill(image_mask[:, None, :], image_mask_id),
        text_mask=text_mask, image_mask=image_mask, t_text=t_text, t_image=t_image, task=task)


def part_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
              schedule: MaskSchedule) -> Tuple[torch.Tensor, torch.Tensor]:
    """ELBO-weighted masked CE of one part.

    logits [B, L, V] (text) or [B, 8, N, K] (image); targets the clean ids [B, L] / [B, 8, N];
    mask bool [B, L] / [B, N]; t [B]. Returns (loss averaged over the noised samples — 0 if none —,
    per-sample unweighted masked CE per token [B]) for logging.
    """
    # Classes on the last, contiguous dim: much faster than a permuted class dim 1 on CPU.
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view(targets.shape)  # [B, 8, N] or [B, L]
    if logits.dim() == 4:  # image: positions carry 8 codes, mask is per position
        ce = ce.mean(dim=1)  # [B, N]
    per_sample = (ce * mask).sum(dim=1) / mask.shape[1]  # [B]: Σ_masked CE / L_part
    noised = t > 0
    weight = torch.where(noised, schedule.weight(t.clamp_min(1e-12)), torch.zeros_like(t))
    count = noised.sum().clamp_min(1)
    loss = (weight * per_sample).sum() / count
    tokens = mask.sum(dim=1).clamp_min(1)
    return loss, (ce * mask).sum(dim=1) / tokens


def diffusion_loss(model, text_ids: torch.Tensor, image_ids: torch.Tensor, labels: torch.Tensor,
                   schedule: MaskSchedule, *, text_weight: float = 1.0, mix: TaskMix = TaskMix(),
                   t_min: float = 1e-3, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """One training objective evaluation. Returns dict(loss, image_loss, text_loss, image_ce, text_ce)
    — the *_ce entries are the unweighted CE per masked token (mean over samples with masks), for logging."""
    cfg = model.config if hasattr(model, "config") else model.module.config
    noised = forward_mask(text_ids, image_ids, schedule, text_mask_id=cfg.text_mask_id,
                          image_mask_id=cfg.image_mask_id, mix=mix, t_min=t_min, generator=generator)
    text_logits, image_logits = model(noised.text_ids, noised.image_ids, noised.t_text, noised.t_image, labels)
    image_loss, image_ce = part_loss(image_logits, image_ids, noised.image_mask, noised.t_image, schedule)
    text_loss, text_ce = part_loss(text_logits, text_ids, noised.text_mask, noised.t_text, schedule)
    has_img, has_txt = noised.image_mask.any(dim=1), noised.text_mask.any(dim=1)
    return {
        "loss": image_loss + text_weight * text_loss,
        "image_loss": image_loss.detach(), "text_loss": text_loss.detach(),
        "image_ce": (image_ce * has_img).sum().detach() / has_img.sum().clamp_min(1),
        "text_ce": (text_ce * has_txt).sum().detach() / has_txt.sum().clamp_min(1),
    }
