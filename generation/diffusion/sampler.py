"""Iterative unmasking samplers for the joint diffusion model: text→image, image→report, joint.

Start from the given part(s) clean and the part(s) to generate fully masked; for i = 0..N−1 go from
t = 1 − i/N to s = 1 − (i+1)/N:

* ``confidence`` (MaskGIT, Chang et al. 2022): sample every masked position from p_θ, then keep the
  most confident ones (log-probability of the sampled token; for an image position the sum over its
  8 codes) so that a fraction m(s)/m(1) of the generated positions is still masked afterwards.
* ``ancestral`` (MDLM): each masked position is revealed with probability (m(t) − m(s)) / m(t), its
  value drawn from p_θ.

Given (conditioning) tokens and already-revealed tokens are never changed; after the last step no mask
is left. Classifier-free guidance (:mod:`generation.guidance`, shared with the AR sampler): logits =
u + w·(c − u), where c is the conditional prediction and u the prediction with the null label and the
conditioning part fully masked (w = 1 or None: no guidance, one forward pass per step). Draws: Gumbel-max
over ``filter_logits(logits / T, top_k, top_p)`` (:mod:`generation.sampling`, shared with the AR sampler;
top-k 0 and top-p 1, the defaults, are off); the confidence of a drawn token is its log-probability under
the model's untempered, unfiltered distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from generation.diffusion.masking import MaskSchedule
from generation.guidance import cfg_combine, guidance_on
from generation.sampling import check_sampling_args, gumbel_choose

METHODS = ("confidence", "ancestral")
SAMPLE_TASKS = ("text_to_image", "image_to_text", "joint")


@dataclass
class SamplerOptions:
    steps: int = 16
    method: str = "confidence"
    temperature: float = 1.0
    cfg_scale: Optional[float] = 1.0   # 1.0 or None = no guidance (generation/guidance.py)
    schedule: str = "loglinear"
    top_k: int = 0                     # 0 = off
    top_p: float = 1.0                 # 1 = off

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; choose one of {METHODS}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be ≥ 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be ≥ 0 (0 = greedy)")
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg_scale)


# the old name of the combination; the one formula for every sampler is generation.guidance.cfg_combine
combine_guidance = cfg_combine


def guided_model_logits(model, text_ids, image_ids, t_text, t_image, labels, cfg_scale: Optional[float],
                        condition_part: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(text logits [B, Lt, V], image logits [B, 8, N, K]) with CFG: runs the model once (guidance off:
    ``cfg_scale`` None or 1.0) or twice, and combines with :func:`generation.guidance.cfg_combine`.
    ``condition_part`` ('text' or 'image' or None) is masked out in the unconditional branch."""
    cond = model(text_ids, image_ids, t_text, t_image, labels)
    if not guidance_on(cfg_scale):
        return cond
    cfg = model.config
    u_text, u_image, ut_text, ut_image = text_ids, image_ids, t_text, t_image
    if condition_part == "text":
        u_text, ut_text = torch.full_like(text_ids, cfg.text_mask_id), torch.ones_like(t_text)
    elif condition_part == "image":
        u_image, ut_image = torch.full_like(image_ids, cfg.image_mask_id), torch.ones_like(t_image)
    null = torch.full_like(labels, model.null_label)
    uncond = model(u_text, u_image, ut_text, ut_image, null)
    return cfg_combine(cond[0], uncond[0], cfg_scale), cfg_combine(cond[1], uncond[1], cfg_scale)


# the old name (kept for callers and tests that use it)
guided_logits = guided_model_logits


def draw(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator], top_k: int = 0,
         top_p: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] → (ids [...], log-prob of the drawn id [...] under the untempered, unfiltered
    distribution); temperature 0 = argmax.

    Draws by the Gumbel-max trick (:func:`generation.sampling.gumbel_choose`: argmax of filtered logits/T +
    Gumbel noise, one uniform per logit) on the logits' device; ``generator``, when given, must live on that
    device too."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if temperature == 0:
        ids = logp.argmax(dim=-1)
    else:
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        ids = gumbel_choose(logits, u, temperature, top_k, top_p)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def reveal_count(n_generated: torch.Tensor, schedule: MaskSchedule, s: float) -> torch.Tensor:
    """How many of the generated positions are still masked at time s: floor(n · m(s)/m(1))."""
    ratio = (schedule.mask_prob(torch.tensor(s)) / schedule.mask_prob(torch.tensor(1.0))).item()
    return torch.floor(n_generated.float() * ratio).long()


def unmask_step(mask: torch.Tensor, confidence: torch.Tensor, keep_masked: torch.Tensor) -> torch.Tensor:
    """Confidence ordering: mask [B, L] bool (currently masked), confidence [B, L], keep_masked [B] →
    bool [B, L] of positions to reveal now (the most confident masked ones, so keep_masked stay masked)."""
    conf = confidence.masked_fill(~mask, float("-inf"))
    order = conf.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(mask.shape[1], device=mask.device).expand_as(order))
    n_reveal = (mask.sum(dim=1) - keep_masked).clamp_min(0)
    return mask & (rank < n_reveal[:, None])


@torch.no_grad()
def sample(model, *, task: str, labels: torch.Tensor, text_ids: Optional[torch.Tensor] = None,
           image_ids: Optional[torch.Tensor] = None, options: SamplerOptions = SamplerOptions(),
           generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate the missing part(s).

    task 'text_to_image' needs text_ids [B, Lt]; 'image_to_text' needs image_ids [B, 8, N]; 'joint' needs
    neither. labels [B] in [0, C] (C = null). Returns (text_ids [B, Lt], image_ids [B, 8, N]) with no mask
    id left. Draws use ``generator`` (on the model's device) for reproducibility.
    """
    if task not in SAMPLE_TASKS:
        raise ValueError(f"unknown sampling task {task!r}; choose one of {SAMPLE_TASKS}")
    cfg = model.config
    device = next(model.parameters()).device
    b = labels.shape[0]
    lt, n, k8 = cfg.text_len, cfg.num_positions, cfg.num_codebooks
    if task == "text_to_image":
        if text_ids is None:
            raise ValueError("text_to_image needs text_ids [B, Lt]")
        image_ids = torch.full((b, k8, n), cfg.image_mask_id, dtype=torch.long, device=device)
    elif task == "image_to_text":
        if image_ids is None:
            raise ValueError("image_to_text needs image_ids [B, 8, N]")
        text_ids = torch.full((b, lt), cfg.text_mask_id, dtype=torch.long, device=device)
    else:
        text_ids = torch.full((b, lt), cfg.text_mask_id, dtype=torch.long, device=device)
        image_ids = torch.full((b, k8, n), cfg.image_mask_id, dtype=torch.long, device=device)
    text_ids, image_ids, labels = text_ids.to(device).clone(), image_ids.to(device).clone(), labels.to(device)
    gen_text = task in ("image_to_text", "joint")
    gen_image = task in ("text_to_image", "joint")
    condition_part = {"text_to_image": "text", "image_to_text": "image", "joint": None}[task]
    schedule = MaskSchedule(options.schedule)
    text_mask = text_ids == cfg.text_mask_id
    image_mask = (image_ids == cfg.image_mask_id).any(dim=1)
    n_text, n_image = text_mask.sum(dim=1), image_mask.sum(dim=1)
    zeros = torch.zeros(b, device=device)
    was_training = model.training
    model.eval()
    for i in range(options.steps):
        t, s = 1.0 - i / options.steps, 1.0 - (i + 1) / options.steps
        t_vec = torch.full((b,), t, device=device)
        text_logits, image_logits = guided_model_logits(
            model, text_ids, image_ids, t_vec if gen_text else zeros, t_vec if gen_image else zeros,
            labels, options.cfg_scale, condition_part)
        if gen_text:
            ids, logp = draw(text_logits, options.temperature, generator, options.top_k, options.top_p)
            reveal = _reveal(text_mask, logp, n_text, schedule, t, s, options.method, generator)
            text_ids = torch.where(reveal, ids, text_ids)
            text_mask = text_mask & ~reveal
        if gen_image:
            ids, logp = draw(image_logits, options.temperature, generator, options.top_k, options.top_p)  # [B, 8, N]
            reveal = _reveal(image_mask, logp.sum(dim=1), n_image, schedule, t, s, options.method, generator)
            image_ids = torch.where(reveal[:, None, :], ids, image_ids)
            image_mask = image_mask & ~reveal
    model.train(was_training)
    return text_ids, image_ids


def _reveal(mask, confidence, n_generated, schedule, t, s, method, generator) -> torch.Tensor:
    if s <= 0:
        return mask.clone()
    if method == "confidence":
        return unmask_step(mask, confidence, reveal_count(n_generated, schedule, s).to(mask.device))
    m_t = schedule.mask_prob(torch.tensor(t)).item()
    m_s = schedule.mask_prob(torch.tensor(s)).item()
    u = torch.rand(mask.shape, generator=generator, device=mask.device)
    return mask & (u < (m_t - m_s) / m_t)
