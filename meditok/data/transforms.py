"""Tensor transforms: stage-1 augmentation, CT window augmentation, evaluation resize (docs/method.md §3).

All transforms take and return float tensors in [-1, 1] ([3, H, W], or [B, 3, H, W] where
noted), except :class:`RandomCTWindow`, which takes Hounsfield units. Randomness comes from
torch's global generator, which :func:`meditok.data.make_worker_init_fn` seeds per rank and per
DataLoader worker, so augmented runs are reproducible.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from .windows import CT_WINDOWS, DEFAULT_CT_WINDOW, CTWindow, ct_window

# Released stage-1 defaults (docs/method.md §3).
CROP_SCALE = (0.9, 1.0)
HORIZONTAL_FLIP_P = 0.5
VERTICAL_FLIP_P = 0.5
QUARTER_TURN_P = 0.5
GRAYSCALE_P = 0.1
CT_WINDOW_P = 0.5


class RandomCTWindow(torch.nn.Module):
    """Window CT Hounsfield units, drawing a random named window with probability `p`.

    With probability `p` a window is drawn from `windows` by their probabilities (docs/method.md §3: full 0.2,
    common 0.3, soft tissue 0.3, lung 0.15, bone 0.05); otherwise the `default` window is used.
    Pass an instance as the `ct_window` of a dataset so it sees HU, not an already-windowed image.

    Input: HU tensor [1, H, W] (or [H, W]). Output: float32 [3, H, W] in [-1, 1].
    """

    def __init__(
        self,
        p: float = CT_WINDOW_P,
        windows: dict[str, CTWindow] | None = None,
        default: str = DEFAULT_CT_WINDOW,
    ):
        super().__init__()
        self.p = p
        self.windows = dict(CT_WINDOWS if windows is None else windows)
        if default not in self.windows and default not in CT_WINDOWS:
            raise ValueError(f"unknown default window {default!r}; use one of {sorted(CT_WINDOWS)}")
        self.default = default
        self._names = list(self.windows)
        self._probabilities = torch.tensor([w.probability for w in self.windows.values()])

    def sample_window(self, generator: torch.Generator | None = None) -> str:
        """Name of the window for one image (the default when no random window is drawn)."""
        if torch.rand((), generator=generator).item() >= self.p:
            return self.default
        drawn = torch.multinomial(self._probabilities, 1, generator=generator).item()
        return self._names[drawn]

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        name = self.sample_window()
        window = self.windows.get(name) or CT_WINDOWS[name]
        image = ct_window(hu if hu.ndim == 3 else hu[None], window.low, window.high)
        return image.expand(3, -1, -1).contiguous()

    def extra_repr(self) -> str:
        return f"p={self.p}, windows={self._names}, default={self.default!r}"


class RandomQuarterTurn(torch.nn.Module):
    """Rotate by +90 or -90 degrees (equally likely) with probability `p`.

    Exact pixel rotation (no interpolation). Input/output: [..., C, H, W]; H and W swap on a turn.
    """

    def __init__(self, p: float = QUARTER_TURN_P):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= self.p:
            return image
        turns = 1 if torch.rand(()).item() < 0.5 else -1
        return torch.rot90(image, turns, dims=(-2, -1))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ClampToUnitRange(torch.nn.Module):
    """Clamp to [-1, 1]: antialiased resampling can land a rounding error outside the range."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.clamp(-1.0, 1.0)


def stage1_augmentation(size: int) -> v2.Compose:
    """Released stage-1 training augmentation (docs/method.md §3), for images in [-1, 1].

    Random resized crop to `size` x `size` with scale (0.9, 1.0) (torchvision's default aspect
    ratios 3/4..4/3, bilinear with antialiasing), horizontal and
    vertical flips p=0.5 each, a +-90 degree turn p=0.5, random grayscale p=0.1 (3 channels kept).

    Input: float tensor [3, H, W] in [-1, 1]. Output: float tensor [3, size, size] in [-1, 1].
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(HORIZONTAL_FLIP_P),
            v2.RandomVerticalFlip(VERTICAL_FLIP_P),
            RandomQuarterTurn(QUARTER_TURN_P),
            v2.RandomGrayscale(GRAYSCALE_P),
            ClampToUnitRange(),
        ]
    )


def eval_transform(size: int) -> v2.Compose:
    """Evaluation preprocessing: resize the short side to `size`, then centre-crop to a square.

    For square inputs this is exactly the "resize only" of docs/method.md §3; for others, the centre crop keeps
    the aspect ratio instead of distorting it. Bilinear with antialiasing.

    Input: float tensor [3, H, W] in [-1, 1]. Output: [3, size, size] in [-1, 1].
    """
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), ClampToUnitRange()])
