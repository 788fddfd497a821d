"""Training losses of docs/method.md §2 (everything except the networks they use, which live in
``perceptual.py`` and ``discriminator.py``).

L_recon = 0.2·L1 + 1.0·L2 + 1.0·LPIPS + λ_adv·L_adv + 1.0·L_vq, with λ_adv adaptive (VQGAN):
0.4 × warm-up × ‖∇L_nll‖ / ‖∇L_adv‖ at the decoder's last layer, clamped to [0.015, 1e4].
L_contrast: symmetric CLIP InfoNCE between the tokenizer's alignment features and the teacher's,
over the global batch (features gathered across ranks with gradient).
Discriminator: hinge loss + balanced consistency regularisation (BCR, weight 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from training import distributed as dist


#: two targets whose cosine similarity reaches this are the same target (e.g. one caption for two images)
SAME_TARGET_COSINE = 1.0 - 1e-5


def clip_contrastive_loss(image_features: torch.Tensor, target_features: torch.Tensor,
                          logit_scale: torch.Tensor, mask_same_targets: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    image_features, target_features: [b, D] per rank, ℓ2-normalised; logit_scale: exp'd scalar.
    Both sides are gathered from all ranks (with gradient); every rank computes the same loss over
    the global batch of N = world·b pairs: ½·(CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)).

    ``mask_same_targets``: pairs (i, j ≠ i) whose targets are the same (cosine ≥ ``SAME_TARGET_COSINE``: two
    images with one caption) are left out of both softmaxes instead of being pushed apart as negatives. The
    paper's loss is the default; with distinct targets both give the same value.
    """
    img = dist.all_gather_with_grad(image_features)
    tgt = dist.all_gather_with_grad(target_features)
    logits = logit_scale * img @ tgt.t()  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    if mask_same_targets:
        with torch.no_grad():
            same = (tgt @ tgt.t()) >= SAME_TARGET_COSINE
            same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))  # symmetric: the same pairs leave the transposed softmax
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 − D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: −mean(D(G(z)))."""
    return -logits_fake.mean()


def bcr_loss(logits_real: torch.Tensor, logits_real_aug: torch.Tensor,
             logits_fake: torch.Tensor, logits_fake_aug: torch.Tensor) -> torch.Tensor:
    """Balanced consistency regularisation (Zhao et al. 2020): the discriminator should answer the same
    for an image and its strongly augmented copy, for real and fake alike:
    MSE(D(T(x)), D(x)) + MSE(D(T(G(z))), D(G(z))). As in the released training, the gradient flows
    through both terms of each pair."""
    return F.mse_loss(logits_real_aug, logits_real) + F.mse_loss(logits_fake_aug, logits_fake)


def adaptive_adversarial_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, base: float = 0.4,
                                warmup: float = 1.0, clamp: Tuple[float, float] = (0.015, 1e4)) -> torch.Tensor:
    """λ_adv = base · warmup · ‖∇_w L_nll‖ / ‖∇_w L_adv‖ (VQGAN), from the two gradients at the decoder's
    last-layer weight w; the ratio is clamped to ``clamp``. Returned detached. (The trainer gets both gradients
    cheaply from image-space gradients it needs anyway: see ``Trainer.backward``.)"""
    ratio = nll_grad.detach().float().norm() / (g_grad.detach().float().norm() + 1e-6)
    return (base * warmup * ratio.clamp(*clamp)).detach()


# --------------------------------------------------------------------------------------------------
# Loss terms as declarations: the trainer evaluates and differentiates whatever is declared here.

class LossKind(str, Enum):
    """How a term's gradient reaches the tokenizer (see ``GeneratorObjective``)."""
    IMAGE = "image"  # fn(x̂, x) → scalar: part of L_nll, differentiated w.r.t. x̂ and in the adaptive weight
    LATENT = "latent"  # fn(model outputs) → scalar (VQ, contrastive): backpropagated directly
    ADVERSARIAL = "adversarial"  # fn(x̂) → scalar through the discriminator, weighted by λ_adv (VQGAN)


@dataclass(frozen=True)
class LossTerm:
    """One term of the tokenizer's objective: logged as ``loss/<name>``; weight 0 means not declared."""
    name: str
    kind: LossKind
    weight: float
    fn: Callable[..., torch.Tensor]


@dataclass
class GeneratorObjective:
    """The single-backward contract of a training step: every image-space term contributes to
    ``rec_grad`` = ∂L/∂x̂ (taken on a detached copy of x̂, so LPIPS and DINO are differentiated once),
    every latent term to the scalar ``latent``; ``backward`` then carries both through the tokenizer in
    one pass. A term declared with its kind is automatically part of both."""
    rec_grad: torch.Tensor
    latent: torch.Tensor

    def backward(self, rec: torch.Tensor, scale: float) -> None:
        outputs, grads = [rec], [self.rec_grad * scale]
        if self.latent.requires_grad:  # no latent term declared: nothing more to carry
            outputs.append(self.latent * scale)
            grads.append(None)
        torch.autograd.backward(outputs, grads)
