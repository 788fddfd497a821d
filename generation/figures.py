"""Sample grids with their text on the image: a title strip above the grid and a caption under each image.

One function, :func:`captioned_grid`, for every generator's PNGs (the AR sampler's per-label grids, the
diffusion sampler's text→image / joint grids), so a figure says what it shows without its file name. Text is
drawn with PIL's default font (``ImageFont.load_default()``), black on white. The layout is fixed by the
arguments alone (never by the length of the text), so the size of the PNG is known in advance
(:func:`grid_size`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

LINE_HEIGHT = 12  # px per line of text (PIL's default font is about 11 px tall)
PAD = 4           # px of white above and below every block of text
ELLIPSIS = "..."


def strip_height(lines: int) -> int:
    """Height in px of a text strip of ``lines`` lines: lines·LINE_HEIGHT + 2·PAD (0 for no lines)."""
    return lines * LINE_HEIGHT + 2 * PAD if lines > 0 else 0


def grid_size(n: int, height: int, width: int, *, captions: bool, title: bool, columns: int = 8,
              min_tile: int = 64, caption_lines: int = 3) -> Tuple[int, int]:
    """(width, height) in px of the PNG :func:`captioned_grid` writes for ``n`` images of ``height`` × ``width``.

    s = max(1, ceil(min_tile / width)) (integer nearest-neighbour enlargement), c = min(columns, n) columns,
    r = ceil(n / c) rows:  width = c·width·s;  height = T + r·(height·s + C), with the title strip
    T = strip_height(1) = 20 px when there is a title, and the caption strip under each row of images
    C = strip_height(caption_lines) (= 44 px for 3 lines) when there are captions.
    """
    scale = max(1, math.ceil(min_tile / width))
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    tile_h, tile_w = height * scale, width * scale
    caption_h = strip_height(caption_lines) if captions else 0
    return cols * tile_w, (strip_height(1) if title else 0) + rows * (tile_h + caption_h)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """The text on one line (newlines and runs of spaces → one space); outside Latin-1 replaced by '?' when
    PIL has only its bitmap font (no FreeType)."""
    from PIL import ImageFont

    text = " ".join(str(text).split())
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def _longest_prefix(text: str, fits) -> int:
    """The largest k with fits(k) (fits monotone: true up to some k), 0 if none."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def fit_line(text: str, width: float, measure, cut: bool = False) -> str:
    """``text`` when it is at most ``width`` px wide (``measure(str) -> px``) and ``cut`` is False; else its
    longest prefix followed by "..." that is."""
    if not cut and measure(text) <= width:
        return text
    k = _longest_prefix(text, lambda k: measure(text[:k].rstrip() + ELLIPSIS) <= width)
    return text[:k].rstrip() + ELLIPSIS if k or measure(ELLIPSIS) <= width else ""


def wrap_text(text: str, width: float, max_lines: int, measure) -> List[str]:
    """Greedy word wrap to lines of at most ``width`` px (``measure(str) -> px``); a word wider than a line is
    broken; at most ``max_lines`` lines, the last one ending in "..." when text is left over."""
    lines: List[str] = []
    words = text.split()
    current = ""
    while words and len(lines) < max_lines:
        candidate = f"{current} {words[0]}" if current else words[0]
        if measure(candidate) <= width:
            current = candidate
            words.pop(0)
            continue
        if not current:  # one word wider than the line: break it
            word = words.pop(0)
            k = max(1, _longest_prefix(word, lambda k: measure(word[:k]) <= width))
            current = word[:k]
            if word[k:]:
                words.insert(0, word[k:])
        lines.append(current)
        current = ""
    if current:
        lines.append(current)
    if words and lines:  # text left over: the last line says so
        lines[-1] = fit_line(lines[-1] + " " + " ".join(words), width, measure, cut=True)
    return lines


def _as_uint8(images: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """[N, C, H, W] in [0, 1] (C = 1 or 3) → uint8 [N, H, W, 3], round(x·255) as torchvision's save_image."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"captioned_grid: images must be [N, 3, H, W] (or [N, 1, H, W]) in [0, 1], got shape "
                         f"{tuple(images.shape)}; pass e.g. (pixels + 1) / 2 for pixels in [-1, 1]")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def captioned_grid(images: Union[torch.Tensor, np.ndarray], captions: Optional[Sequence[str]] = None,
                   title: Optional[str] = None, path: Union[str, Path] = "grid.png", *, columns: int = 8,
                   min_tile: int = 64, caption_lines: int = 3) -> Path:
    """Write a PNG grid of ``images`` with ``title`` in a strip above it and ``captions[i]`` under image i.

    Args:
        images: [N, 3, H, W] (or [N, 1, H, W]) float in [0, 1], row-major into the grid.
        captions: N strings (or None: no caption strips), each wrapped to its tile's width and cut to
            ``caption_lines`` lines, the last ending in "..." when the text does not fit.
        title: one line (cut with "..." to the grid's width) in a strip above the grid; None: no strip.
        path: the PNG to write (written atomically; parent folders created).
        columns: images per row (at most N).
        min_tile: tiles narrower than this are enlarged by an integer factor (nearest neighbour).
        caption_lines: lines of text under each image.

    Returns the path. Size in px: :func:`grid_size` (width = columns·W·s; height = 20 (title) +
    rows·(H·s + caption_lines·12 + 8 (captions)), s = max(1, ceil(min_tile / W))).
    """
    from PIL import Image, ImageDraw

    from meditok import atomic_write

    pixels = _as_uint8(images)
    n, h, w, _ = pixels.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"captioned_grid({path}): {len(captions)} captions for {n} images; give one per image")
    if caption_lines < 1:
        raise ValueError(f"captioned_grid({path}): caption_lines={caption_lines}; use 1 or more")
    scale = max(1, math.ceil(min_tile / w))
    cols = max(1, min(columns, n))
    tile_h, tile_w = h * scale, w * scale
    title_h = strip_height(1) if title is not None else 0
    caption_h = strip_height(caption_lines) if captions is not None else 0
    size = grid_size(n, h, w, captions=captions is not None, title=title is not None, columns=columns,
                     min_tile=min_tile, caption_lines=caption_lines)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()

    def measure(text: str) -> float:
        return draw.textlength(text, font=font)

    if title is not None:
        draw.text((PAD, PAD), fit_line(_drawable(title, font), size[0] - 2 * PAD, measure), fill=(0, 0, 0),
                  font=font)
    for i in range(n):
        r, c = divmod(i, cols)
        left, top = c * tile_w, title_h + r * (tile_h + caption_h)
        tile = Image.fromarray(pixels[i])
        if scale > 1:
            tile = tile.resize((tile_w, tile_h), Image.NEAREST)
        canvas.paste(tile, (left, top))
        if captions is not None:
            lines = wrap_text(_drawable(captions[i], font), tile_w - 4, caption_lines, measure)
            for k, line in enumerate(lines):
                draw.text((left + 2, top + tile_h + PAD + k * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
    return Path(path)
