"""Metrics of generated images (paper Table 3), shared by the AR and discrete-diffusion generators.

* **gFID** per modality: Fréchet distance between pytorch-fid InceptionV3 pool3 features of generated and
  held-out real images of that modality (:mod:`evaluation.fid_inception`, the same network, weights file and
  preprocessing as rFID: images quantised to uint8, [0, 1], resized to 299 inside pytorch-fid).
* **Diversity** (the paper's definition): for N samples of one modality, the mean of (1 − MS-SSIM) over all
  N·(N−1)/2 distinct pairs; then the mean over modalities. MS-SSIM (Wang, Simoncelli & Bovik 2003: Gaussian
  window 11, σ 1.5, K1 0.01, K2 0.03, data range 1, five scales with their weights, negative terms clamped
  at 0 so dissimilar pairs stay finite) comes from pytorch-msssim, whose per-scale SSIM equals
  scikit-image's (the project's SSIM convention); the tests check it against torchmetrics' implementation.
  Five scales need sides > 160 px; smaller images (CPU try-outs) use torchmetrics with the largest number
  of scales that fits and the first weights renormalised to sum 1, and the result records the scales used.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from .metrics import frechet_distance_from_features, frechet_distance_of, GaussianStatistics

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang, Simoncelli & Bovik (2003)
MS_SSIM_WINDOW = 11


def ms_ssim_scales(side: int, window: int = MS_SSIM_WINDOW) -> int:
    """The most scales (≤ 5) for which the coarsest image is still larger than the window."""
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if side > (window - 1) * 2 ** (scales - 1):
            return scales
    raise ValueError(f"images of {side} px are too small for MS-SSIM with an {window}-px window (need > {window - 1})")


def ms_ssim_weights(scales: int):
    weights = MS_SSIM_WEIGHTS[:scales]
    return tuple(w / sum(weights) for w in weights)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: Optional[int] = None) -> torch.Tensor:
    """Per-pair MS-SSIM of images in [0, 1].

    Args:
        a, b: [P, C, H, W] float in [0, 1] (C = 1 or 3).
        scales: number of scales (default: :func:`ms_ssim_scales` of the smaller side). 5: pytorch-msssim;
            fewer: torchmetrics with renormalised weights (pytorch-msssim only does 5).

    Returns:
        float64 [P], 1 for identical images.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ms_ssim: expected two [P, C, H, W] batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    scales = scales or ms_ssim_scales(min(a.shape[-2:]))
    if scales == len(MS_SSIM_WEIGHTS):
        from pytorch_msssim import ms_ssim as pytorch_msssim

        return pytorch_msssim(a.double(), b.double(), data_range=1.0, size_average=False, win_size=MS_SSIM_WINDOW,
                              win_sigma=1.5, weights=list(MS_SSIM_WEIGHTS), K=(0.01, 0.03)).reshape(-1)
    return torchmetrics_ms_ssim(a, b, scales)


def torchmetrics_ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: int = len(MS_SSIM_WEIGHTS)) -> torch.Tensor:
    """The same quantity from torchmetrics (any number of scales); float64 [P]."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    value = multiscale_structural_similarity_index_measure(
        a.double(), b.double(), gaussian_kernel=True, sigma=1.5, kernel_size=MS_SSIM_WINDOW, reduction="none",
        data_range=1.0, k1=0.01, k2=0.03, betas=ms_ssim_weights(scales), normalize="relu")
    return value.reshape(-1)


def pairwise_diversity(images: torch.Tensor, batch_size: int = 256) -> Dict[str, float]:
    """Mean (1 − MS-SSIM) over all distinct pairs of ``images`` [N, C, H, W] in [0, 1] (N ≥ 2)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images of a modality, got {n}")
    first, second = torch.triu_indices(n, n, offset=1)
    scales = ms_ssim_scales(min(images.shape[-2:]))
    values = [ms_ssim(images[first[s:s + batch_size]], images[second[s:s + batch_size]], scales)
              for s in range(0, first.numel(), batch_size)]
    similarity = torch.cat(values)
    return {"diversity": float((1.0 - similarity).mean()), "pairs": int(first.numel()), "images": n,
            "ms_ssim_scales": scales}


def diversity_over_modalities(groups: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Paper's diversity: per-modality :func:`pairwise_diversity`, then their plain mean.

    Args:
        groups: modality → images [N, C, H, W] in [0, 1].
    """
    per_modality = {name: pairwise_diversity(images) for name, images in groups.items()}
    return {"per_modality": per_modality,
            "mean": float(np.mean([r["diversity"] for r in per_modality.values()])) if per_modality else math.nan}


@torch.no_grad()
def inception_feature_bank(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Pool3 features [N, 2048] (float64) of images [N, 3, H, W] in [0, 1]."""
    from .fid_inception import inception_features

    parts = [inception_features(network, images[s:s + batch_size]) for s in range(0, images.shape[0], batch_size)]
    return torch.cat(parts).double().numpy()


def gfid(generated_features: np.ndarray, real_features: np.ndarray) -> float:
    """Fréchet distance between two feature sets [N, 2048] (see evaluation.metrics for the exact computation)."""
    a, b = GaussianStatistics(generated_features.shape[1]), GaussianStatistics(real_features.shape[1])
    a.update(generated_features)
    b.update(real_features)
    return frechet_distance_of(a, b)


def gfid_per_modality(network: torch.nn.Module, generated: Mapping[str, torch.Tensor], real: Mapping[str, torch.Tensor],
                      batch_size: int = 64, min_images: int = 2) -> Dict[str, object]:
    """gFID of each modality's generated images against that modality's real images, and their mean ± std.

    Args:
        generated, real: modality → images [N, 3, H, W] in [0, 1] (uint8-quantised, as in
            :func:`evaluation.metrics.quantize_to_unit`). Modalities with fewer than ``min_images`` on either
            side get None (a covariance needs ≥ 2 vectors; a meaningful FID needs thousands).
    """
    per_modality: Dict[str, Optional[float]] = {}
    for name, fake in generated.items():
        reference = real.get(name)
        if reference is None or min(len(fake), len(reference)) < min_images:
            per_modality[name] = None
            continue
        per_modality[name] = gfid(inception_feature_bank(network, fake, batch_size),
                                  inception_feature_bank(network, reference, batch_size))
    values = [v for v in per_modality.values() if v is not None]
    return {"per_modality": per_modality, "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if len(values) > 1 else None}


__all__ = ["MS_SSIM_WEIGHTS", "diversity_over_modalities", "frechet_distance_from_features", "gfid", "gfid_per_modality",
           "inception_feature_bank", "ms_ssim", "ms_ssim_scales", "ms_ssim_weights", "pairwise_diversity", "torchmetrics_ms_ssim"]
