"""Quality rules of docs/method.md §3 (paper appendix A.2): 2D image QC and 3D->2D slice selection.

Each rule returns the list of reasons an image or slice is dropped (empty: keep), so tools can
write the reason next to every dropped file. Thresholds are dataclass fields, defaulting to the
paper's numbers, so a tool can expose them as options.

Non-finite values (NaN/Inf) are a reason of their own in every rule: the statistics below would
otherwise be NaN (and NaN compares false, so a NaN image could pass) or come from an arbitrary cast.
The readers already refuse such files (quality control then drops them as unreadable, with the
count); the rules check again for arrays that come from elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageQualityThresholds:
    """2D QC (appendix A.2.2), on the 8-bit RGB proxy of an image.

    Drop when intensity range < min_intensity_range, shortest side < min_short_side pixels,
    std < min_std, or number of distinct values <= max_distinct_values_dropped.
    """

    min_intensity_range: float = 50.0
    min_short_side: int = 128
    min_std: float = 10.0
    max_distinct_values_dropped: int = 3


def non_finite_reason(values) -> list[str]:
    """['N of M values are not finite (NaN/Inf)'] when any value is NaN or infinite, else []."""
    values = np.asarray(values)
    if values.dtype.kind not in "fc":
        return []
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return [f"{bad} of {values.size} values are not finite (NaN/Inf)"] if bad else []


def rgb_proxy(image: torch.Tensor) -> np.ndarray:
    """The 8-bit RGB image QC looks at.

    Args:
        image: float tensor [3, H, W] in [-1, 1], as returned by read_image (CT therefore through
            the default window).
    Returns:
        uint8 array [H, W, 3] in 0..255.
    Raises:
        ValueError: the image holds NaN/Inf (casting them to uint8 would give arbitrary values).
    """
    reasons = non_finite_reason(image.detach().cpu().numpy())
    if reasons:
        raise ValueError(f"rgb_proxy: {reasons[0]}; read_image refuses such files")
    proxy = ((image.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return proxy.permute(1, 2, 0).numpy()


def image_rejection_reasons(
    proxy: np.ndarray, thresholds: ImageQualityThresholds = ImageQualityThresholds()
) -> list[str]:
    """Why a 2D image fails QC; [] if it passes.

    Args:
        proxy: uint8 (or any numeric) array [H, W] or [H, W, C] on the 0..255 scale.
    Statistics use every value of every channel: range = max - min, std = population std,
    distinct = number of unique values.
    """
    t = thresholds
    values = np.asarray(proxy)
    reasons = non_finite_reason(values)
    if reasons:
        return reasons
    intensity_range = float(values.max()) - float(values.min())
    if intensity_range < t.min_intensity_range:
        reasons.append(f"intensity range {intensity_range:g} < {t.min_intensity_range:g}")
    short_side = min(values.shape[:2])
    if short_side < t.min_short_side:
        reasons.append(f"short side {short_side} px < {t.min_short_side}")
    std = float(values.std(dtype=np.float64))
    if std < t.min_std:
        reasons.append(f"std {std:.3f} < {t.min_std:g}")
    distinct = int(np.unique(values).size)
    if distinct <= t.max_distinct_values_dropped:
        reasons.append(f"{distinct} distinct value(s) <= {t.max_distinct_values_dropped}")
    return reasons


@dataclass(frozen=True)
class CTSliceThresholds:
    """CT slice selection (appendix A.2.1), on HU clipped to [-1000, 2000].

    Keep a slice when background ratio (HU <= -1000) <= max_background_ratio, body ratio
    (HU >= -300) >= min_body_ratio, and HU std < max_std.

    max_std = 100 is the paper *as printed*. A slice containing a body and air has an HU std of
    several hundred, so this rule keeps few slices of real scans; the slicing tool reports how
    many it dropped and lets you change it (--ct-max-std).
    """

    max_background_ratio: float = 0.6
    min_body_ratio: float = 0.1
    max_std: float = 100.0
    background_hu: float = -1000.0
    body_hu: float = -300.0


def ct_slice_rejection_reasons(
    hu: np.ndarray, thresholds: CTSliceThresholds = CTSliceThresholds()
) -> list[str]:
    """Why a CT slice is dropped; [] to keep. `hu`: [H, W] Hounsfield units, clipped as in docs/method.md §3."""
    t = thresholds
    hu = np.asarray(hu, dtype=np.float64)
    reasons = non_finite_reason(hu)
    if reasons:
        return reasons
    background_ratio = float(np.mean(hu <= t.background_hu))
    if background_ratio > t.max_background_ratio:
        reasons.append(f"background ratio {background_ratio:.4f} > {t.max_background_ratio:g}")
    body_ratio = float(np.mean(hu >= t.body_hu))
    if body_ratio < t.min_body_ratio:
        reasons.append(f"body ratio {body_ratio:.4f} < {t.min_body_ratio:g}")
    std = float(hu.std())
    if not std < t.max_std:
        reasons.append(f"HU std {std:.2f} >= {t.max_std:g}")
    return reasons


@dataclass(frozen=True)
class MRISliceThresholds:
    """MRI slice selection (appendix A.2.1), on the volume normalised to [-1, 1].

    Drop a slice with mean <= max_mean_dropped or std <= max_std_dropped.
    """

    max_mean_dropped: float = -0.9
    max_std_dropped: float = 0.2


def mri_slice_rejection_reasons(
    normalised: np.ndarray, thresholds: MRISliceThresholds = MRISliceThresholds()
) -> list[str]:
    """Why an MRI slice is dropped; [] to keep. `normalised`: [H, W] in [-1, 1]."""
    t = thresholds
    values = np.asarray(normalised, dtype=np.float64)
    reasons = non_finite_reason(values)
    if reasons:
        return reasons
    mean, std = float(values.mean()), float(values.std())
    if mean <= t.max_mean_dropped:
        reasons.append(f"mean {mean:.4f} <= {t.max_mean_dropped:g}")
    if std <= t.max_std_dropped:
        reasons.append(f"std {std:.4f} <= {t.max_std_dropped:g}")
    return reasons
