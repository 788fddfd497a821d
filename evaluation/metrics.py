"""Image-reconstruction and classification metrics with stated conventions.

Reconstruction (docs/evaluation.md gives the full conventions):

* Both images go through the same uint8 quantisation before any metric: ``[-1, 1]`` →
  ``round((x + 1) · 127.5)`` → ``/ 255`` → ``[0, 1]`` (:func:`quantize_to_unit`). A reconstruction is
  thus judged as the 8-bit image a user would save, and the original as the 8-bit image it came from.
* PSNR with data range 1: ``10 · log10(1 / MSE)``, MSE over all channels and pixels of one image.
* SSIM is scikit-image's ``structural_similarity`` with data range 1 and Wang et al. (2004)'s Gaussian
  window (σ = 1.5, 11 × 11, population covariance, K1 = 0.01, K2 = 0.03), computed per RGB channel and
  averaged. (The LlamaGen script used data_range=2 on [0, 1] images, which inflates SSIM.)
* Fréchet distance between two Gaussians, computed in float64 through a symmetric eigendecomposition
  (see :func:`frechet_distance`); agrees with pytorch-fid's ``calculate_frechet_distance``.

Classification (linear probes): ROC AUC (Mann–Whitney, ties count half) and average precision (the
step-wise sum over recall increments, ties grouped), one-vs-rest macro means for multi-class tasks and
per-label means for multi-label tasks; for binary (2-class) tasks the AP is the positive class's, with the
two-class mean beside it. Scores are float64 log-odds (:func:`class_log_odds`), never saturated
probabilities, so confident predictions keep their ranks.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from skimage.metrics import structural_similarity

# Wang et al. (2004) settings, the ones scikit-image's docs name for reproducing the paper.
SSIM_SETTINGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}


# ------------------------------------------------------------------------------------------------
# Reconstruction


class NonFiniteImageError(ValueError):
    """An image or reconstruction holding NaN/Inf reached a metric; the message says which and how many."""


def require_finite(images: torch.Tensor, what: str) -> torch.Tensor:
    """``images`` unchanged when every value is finite, else :class:`NonFiniteImageError` naming ``what``
    and the count. A NaN cast to uint8 becomes an arbitrary grey level, which would give a finite PSNR."""
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise NonFiniteImageError(f"{what}: {bad} of {finite.numel()} values are not finite (NaN/Inf); "
                                  "no metric is computed from them")
    return images


def quantize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[..., H, W] float in [-1, 1] (values outside are clipped) → uint8 in 0..255, round half to even.

    Same mapping as ``meditok.data.slicing.signed_to_uint8``, so saved PNGs and metrics agree.

    Raises:
        NonFiniteImageError: any value is NaN/Inf (there is no uint8 for it).
    """
    require_finite(images, "quantize_to_uint8 input")
    return torch.round((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)


def quantize_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[..., H, W] float in [-1, 1] → float32 in [0, 1] on the uint8 grid (k / 255)."""
    return quantize_to_uint8(images).float() / 255.0


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB.

    Args:
        reference, test: [B, C, H, W] (or [B, ...]) floats on the same scale, e.g. [0, 1].
        data_range: the scale's range (1 for [0, 1]).

    Returns:
        float64 [B]; ``inf`` where the two images are identical; ``nan`` for an image where either side
        holds NaN/Inf (never a finite number from non-finite pixels).
    """
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(reference.shape)} vs {tuple(test.shape)}")
    mse = (reference.double() - test.double()).pow(2).flatten(1).mean(dim=1)
    mse = torch.where(torch.isfinite(mse), mse, torch.full_like(mse, float("nan")))  # Inf pixels: nan, not -inf
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (scikit-image, :data:`SSIM_SETTINGS`), as a fraction (×100 for %).

    Args:
        reference, test: [B, C, H, W] in [0, 1] (C = 3: SSIM per channel, averaged) or [B, H, W]
            grayscale. Sides must be at least 11 pixels (the Gaussian window).

    Returns:
        float64 [B].
    """
    if reference.shape != test.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(reference.shape)} vs {tuple(test.shape)}")
    if min(reference.shape[-2:]) < 11:
        raise ValueError(f"ssim: images of {tuple(reference.shape[-2:])} px are smaller than the 11 × 11 window")
    a = reference.detach().cpu().double().numpy()
    b = test.detach().cpu().double().numpy()
    values = []
    for x, y in zip(a, b):
        if x.ndim == 3:  # [C, H, W] → channel axis first
            values.append(structural_similarity(x, y, channel_axis=0, **SSIM_SETTINGS))
        else:
            values.append(structural_similarity(x, y, **SSIM_SETTINGS))
    return torch.tensor(values, dtype=torch.float64)


class GaussianStatistics:
    """Streaming mean and covariance of feature vectors (for Fréchet distances), in float64.

    Sums are taken around a fixed shift (the first batch's mean) so that the covariance
    ``(Σ (x-s)(x-s)ᵀ - n·(μ-s)(μ-s)ᵀ) / (n - 1)`` does not lose digits to cancellation.
    The covariance is the unbiased one, as ``numpy.cov`` (and pytorch-fid) compute it.
    While there are at most ``keep_features`` vectors (default: the dimension) they are also kept,
    which lets :func:`frechet_distance_of` use an exact low-rank formula for small sets.
    """

    def __init__(self, dim: int, keep_features: Optional[int] = None):
        self.dim = dim
        self.count = 0
        self.keep_features = dim if keep_features is None else keep_features
        self._shift: Optional[np.ndarray] = None
        self._sum = np.zeros(dim)
        self._outer = np.zeros((dim, dim))
        self._kept: Optional[list] = []

    def update(self, features) -> None:
        """Add a batch of features [B, dim] (tensor or array)."""
        x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {x.shape}")
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        centred = x - self._shift
        self.count += len(x)
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        if self._kept is not None:
            self._kept = self._kept + [x] if self.count <= self.keep_features else None

    @property
    def features(self) -> Optional[np.ndarray]:
        """The vectors added so far [N, dim], or None once more than ``keep_features`` were added."""
        return None if self._kept is None or not self._kept else np.concatenate(self._kept)

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no features were added")
        return self._shift + self._sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        centred_mean = self._sum / self.count
        return (self._outer - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``‖mu1 - mu2‖² + tr(sigma1) + tr(sigma2) - 2·tr((sigma1·sigma2)^½)``.

    ``sigma1·sigma2`` is not symmetric, and a general matrix square root (scipy's ``sqrtm``, used by
    pytorch-fid) can return complex noise for nearly singular covariances. With A = sigma1^½
    (symmetric PSD), sigma1·sigma2 = A·(A·sigma2) has the same eigenvalues as A·sigma2·A, which is
    symmetric PSD, so tr((sigma1·sigma2)^½) = Σ √λ(A·sigma2·A), computed with ``eigvalsh``.

    Args:
        mu1, mu2: [D] means. sigma1, sigma2: [D, D] symmetric positive semi-definite covariances.

    Returns:
        the distance (float, ≥ 0 up to rounding).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_of(stats1: GaussianStatistics, stats2: GaussianStatistics) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (≥ 2 vectors each).

    Uses :func:`frechet_distance_from_features` while both sets still hold their vectors (small sets), else
    :func:`frechet_distance` on the covariances; both compute the same quantity.
    """
    features1, features2 = stats1.features, stats2.features
    if features1 is not None and features2 is not None:
        return frechet_distance_from_features(features1, features2)
    return frechet_distance(stats1.mean, stats1.covariance, stats2.mean, stats2.covariance)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N1, D], [N2, D] (unbiased covariances).

    Exact and cheap when N ≪ D: with centred rows X1, X2, sigma_i = X_iᵀX_i / (N_i - 1), the non-zero
    eigenvalues of sigma1·sigma2 are those of M·Mᵀ / ((N1-1)(N2-1)) with M = X1·X2ᵀ ([N1, N2]), so
    tr((sigma1·sigma2)^½) is the sum of M's singular values over √((N1-1)(N2-1)).
    """
    x1, x2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1] or min(len(x1), len(x2)) < 2:
        raise ValueError(f"need two feature sets [N, D] with the same D and N >= 2, got {x1.shape} and {x2.shape}")
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    centred1, centred2 = x1 - mu1, x2 - mu2
    scale1, scale2 = len(x1) - 1, len(x2) - 1
    trace_sqrt = np.linalg.svd(centred1 @ centred2.T, compute_uv=False).sum() / np.sqrt(scale1 * scale2)
    diff = mu1 - mu2
    return float(diff @ diff + (centred1 ** 2).sum() / scale1 + (centred2 ** 2).sum() / scale2 - 2.0 * trace_sqrt)


# ------------------------------------------------------------------------------------------------
# Classification


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of scores for binary labels: P(score_pos > score_neg) + ½·P(equal).

    Args:
        labels: [N] in {0, 1} (bool or int). scores: [N] floats, higher = more positive.

    Returns:
        AUC in [0, 1], or NaN when only one class is present (AUC undefined).
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann–Whitney U from average ranks: ties get the mean rank, i.e. count one half.
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: Σ_k (R_k − R_{k−1})·P_k over the distinct score thresholds, high to low.

    Tied scores form one threshold (no interpolation), as in scikit-learn's definition.

    Args:
        labels: [N] in {0, 1}. scores: [N] floats, higher = more positive.

    Returns:
        AP in [0, 1], or NaN when there is no positive.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # Last index of each run of equal scores: one operating point per distinct threshold.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_run]
    precision = true_positives / (last_of_run + 1)
    recall = true_positives / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


TASKS = ("multi-class", "multi-label")


def class_log_odds(logits, task: str) -> np.ndarray:
    """Per-class scores in log-space, float64: the log-odds ``log(p_c / (1 - p_c))`` of each class.

    Probabilities saturate: in float32 a softmax gives exactly 1.0 to every prediction with a logit margin
    above ~17 (float64: ~37), and ranking metrics then see ties where the model ranked the samples. The
    log-odds are a strictly increasing function of p_c, so they rank samples as the exact probabilities do,
    and they stay finite and distinct far beyond those margins.

    Args:
        logits: [N, C] (tensor or array). task: 'multi-class' (softmax over C classes) or 'multi-label'
            (C independent sigmoids).

    Returns:
        float64 [N, C]. Multi-class: ``z_c − logsumexp_{k≠c} z_k`` (for 2 classes: ±(z_1 − z_0), exactly);
        multi-label: the logits themselves. A score ≥ 0 means p_c ≥ 0.5 in both cases.
    """
    z = logits.detach().cpu().double().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {z.shape}")
    if task == "multi-label":
        return z.copy()
    if task != "multi-class":
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    num_classes = z.shape[1]
    # [N, C, C]: row c holds the logits of every class but c (−inf in place of c).
    others = np.where(np.eye(num_classes, dtype=bool)[None], -np.inf, z[:, None, :])
    peak = others.max(axis=2, keepdims=True)
    with np.errstate(invalid="ignore"):  # C = 1: no other class; the log-odds are +inf
        rest = peak[..., 0] + np.log(np.exp(others - peak).sum(axis=2))
    return z - rest


def classification_metrics(task: str, labels: np.ndarray, log_odds: np.ndarray) -> Dict[str, float]:
    """AUC, mAP and accuracy of per-class scores, in % (NaN where undefined).

    Args:
        task: 'multi-class' (one label per sample; binary tasks are 2-class) or 'multi-label'.
        labels: multi-class: [N] int class indices; multi-label: [N, C] in {0, 1}.
        log_odds: [N, C] float per-class log-odds, as :func:`class_log_odds` gives them. AUC and AP depend
            only on the ranking of each column, so any strictly increasing function of p_c ranks the same;
            accuracy reads 0 as the decision threshold (p = 0.5) for multi-label tasks.

    Returns:
        ``auc``: multi-class: mean over classes of one-vs-rest AUC (for 2 classes this is the plain
        binary AUC of class 1); multi-label: mean over labels. Classes/labels whose test set has only one
        value are left out of the mean. ``map``: average precision averaged the same way, except for a
        2-class task, where it is the AP of the positive class (label 1). ``map_two_class``: for a
        2-class task the mean AP over both classes (the other common convention), NaN otherwise.
        ``acc``: argmax accuracy (multi-class) or element-wise accuracy at p = 0.5 (multi-label).
        ``classes_scored``: how many classes entered the AUC mean.
    """
    scores = np.asarray(log_odds, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    if task == "multi-class":
        labels = np.asarray(labels).astype(np.int64).ravel()
        one_hot = labels[:, None] == np.arange(scores.shape[1])[None, :]
        accuracy = float((scores.argmax(axis=1) == labels).mean())
    elif task == "multi-label":
        one_hot = np.asarray(labels).astype(bool)
        if one_hot.shape != scores.shape:
            raise ValueError(f"multi-label labels {one_hot.shape} and scores {scores.shape} differ")
        accuracy = float(((scores >= 0.0) == one_hot).mean())
    else:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    aucs = np.array([binary_auc(one_hot[:, c], scores[:, c]) for c in range(scores.shape[1])])
    aps = np.array([average_precision(one_hot[:, c], scores[:, c]) for c in range(scores.shape[1])])
    binary = task == "multi-class" and scores.shape[1] == 2
    return {
        "auc": 100.0 * _nanmean(aucs),
        "map": 100.0 * (float(aps[1]) if binary else _nanmean(aps)),
        "map_two_class": 100.0 * _nanmean(aps) if binary else float("nan"),
        "acc": 100.0 * accuracy,
        "classes_scored": int(np.isfinite(aucs).sum()),
    }


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
