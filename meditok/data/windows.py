"""CT intensity windows (docs/method.md §3).

CT pixels are Hounsfield units (HU): air -1000, water 0, bone several hundred and up. A *window*
[low, high] maps HU linearly to [-1, 1] and clips outside, which is how every CT image reaches the
tokenizer. The five named windows and their sampling probabilities are those of the released
training; `common` is also the window used whenever no random window is drawn.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np
import torch

# CT slices are stored as 16-bit PNGs holding HU + 1024, so that air (-1000 HU, and the -1024
# padding some scanners use) stays non-negative in an unsigned 16-bit file.
CT_PNG_HU_OFFSET = 1024


class CTWindow(NamedTuple):
    """A HU range mapped to [-1, 1], and its probability among the random training windows."""

    low: float
    high: float
    probability: float


CT_WINDOWS: dict[str, CTWindow] = {
    "full": CTWindow(-1000.0, 2000.0, 0.20),
    "common": CTWindow(-1000.0, 1000.0, 0.30),
    "soft_tissue": CTWindow(-150.0, 250.0, 0.30),
    "lung": CTWindow(-1400.0, 200.0, 0.15),
    "bone": CTWindow(-500.0, 1300.0, 0.05),
}

# The window used when no random window is drawn (evaluation, demo, and the 50% of training
# samples that are not window-augmented).
DEFAULT_CT_WINDOW = "common"

WindowSpec = Union[str, tuple[float, float], CTWindow]


def window_bounds(window: WindowSpec) -> tuple[float, float]:
    """(low, high) of a named window ('lung'), a CTWindow, or a (low, high) pair.

    Raises ValueError naming the accepted names when a name is unknown, or when low >= high.
    """
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(
                f"unknown CT window {window!r}; use one of {sorted(CT_WINDOWS)} or a (low, high) "
                "pair in HU"
            )
        low, high = CT_WINDOWS[window].low, CT_WINDOWS[window].high
    else:
        low, high = float(window[0]), float(window[1])
    if not low < high:
        raise ValueError(f"window low must be below high, got ({low}, {high})")
    return low, high


def linear_window(values: torch.Tensor | np.ndarray, low: float, high: float) -> torch.Tensor:
    """Map values linearly so that `low` -> -1 and `high` -> 1, clipping outside.

    Args:
        values: any shape, any real dtype (tensor or array).
    Returns:
        float32 tensor of the same shape, in [-1, 1].
    """
    values = torch.as_tensor(values).to(torch.float32)
    # Compute in float64 so the edges land exactly on -1 and 1 even for large HU offsets.
    scaled = (values.double() - low) * (2.0 / (high - low)) - 1.0
    return scaled.clamp_(-1.0, 1.0).to(torch.float32)


def ct_window(hu: torch.Tensor | np.ndarray, low: float, high: float) -> torch.Tensor:
    """Window Hounsfield units to [-1, 1]: `low` HU -> -1, `high` HU -> 1, clipped outside.

    Args:
        hu: HU values, any shape (typically [1, H, W] or [H, W]).
        low, high: window edges in HU, e.g. ``*window_bounds('lung')``.
    Returns:
        float32 tensor of the same shape as `hu`, in [-1, 1].
    """
    return linear_window(hu, low, high)
