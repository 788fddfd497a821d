"""Map-style dataset over a metadata CSV (docs/method.md §3: identifier, caption, modality)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..seeding import sample_seed
from .errors import MedicalImageError
from .paths import OUTSIDE_ROOT_FIX, resolve_under_root
from .reading import CTWindowArg
from .samples import BadSampleLog, build_sample, check_on_error, read_metadata_csv
from .windows import DEFAULT_CT_WINDOW


class CSVImageDataset(Dataset):
    """Images listed in a metadata CSV, read with :func:`meditok.data.read_image`.

    Map-style, so it works with any sampler, including ``DistributedSampler`` for per-rank
    splitting.

    Args:
        csv_path: the metadata CSV.
        root: folder that relative identifiers are resolved against; None: as written (absolute,
            or relative to the working directory). With a root, every row must resolve inside it
            (after ``..`` and symlinks): see "Data root" below.
        transform: tensor transform applied to the [3, H, W] image in [-1, 1], e.g.
            ``stage1_augmentation(256)`` or ``eval_transform(256)``.
        tokenizer: callable str -> LongTensor; when given, each sample has ``text`` and the
            caption column is required.
        image_column, caption_column, modality_column: column names. The caption column is
            optional without a tokenizer (captions are then ''); modality_column=None means no
            modality column (a CT DICOM is still recognised from its header).
        sep: the CSV separator.
        ct_window: how `ct` rows go from HU to [-1, 1]: a window name, (low, high) in HU, or a
            callable on HU [1, H, W], e.g. ``RandomCTWindow()`` for training.
        on_error: 'raise' (default) fails fast with a MedicalImageError naming the file and the
            CSV line; 'skip' replaces a bad sample by a row drawn uniformly at random among the
            readable rows (see "Skip policy" below), logs a warning, counts it and appends it to
            ``error_log_dir/bad_samples.csv``.
        error_log_dir: where 'skip' writes bad_samples.csv (the run's output folder); None: no file.
        max_consecutive_bad: under 'skip', give up (raise) after this many bad rows for one
            sample (the requested row and its replacement draws), which means the root or the CSV
            is wrong rather than a few files.
        replacement_seed: seed of the replacement draws under 'skip'; None (default) uses
            ``torch.initial_seed()`` of the process reading the sample, which the training's
            per-sample seeding (and DataLoader workers) set reproducibly.
        allow_outside_root: accept rows outside `root` (absolute paths, ``..``, symlinks leading out);
            off by default.

    Data root: with a root, a row whose identifier resolves outside it (``../x.png``, an absolute
    path elsewhere, ``../../../../etc/passwd``, a symlink under the root pointing out) is refused
    when the dataset is built, whatever `on_error`: it is a wrong CSV or root (or a hostile CSV), not
    a bad file, so it fails before training with one MedicalImageError naming the CSV and the first
    rows (line, identifier, where it leads). See :func:`meditok.data.resolve_under_root`.

    Skip policy: the replacement of bad row i is the first readable row of a random order of the
    other rows (rows never tried twice for one sample), drawn from a generator seeded by
    (replacement_seed, i). The first readable row of a uniformly random order is uniform among
    the readable rows, so a block of bad rows does not hand its draws to one neighbour (taking
    "the next readable row" gave the row after a block of N bad rows N+1 draws per pass), and the
    same seed and index give the same replacement on every run and after a resume. Corrupt
    values count as bad rows too: a file holding NaN/Inf, too large to decode (Pillow's
    decompression-bomb limit) or failing in any decoder raises MedicalImageError.

    Each sample is a dict: ``image`` float32 [3, H, W] in [-1, 1] (after `transform`),
    ``modality`` (lower-case str, '' if none), ``caption`` (str), ``identifier`` (str, as in the
    CSV), ``index`` (int, the CSV row actually returned), ``bad_samples_skipped`` (int, bad rows
    skipped to produce this sample: sum it over batches to count bad samples across DataLoader
    workers), and ``text`` when a tokenizer was given.
    """

    def __init__(
        self,
        csv_path: str | Path,
        root: str | Path | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tokenizer: Callable[[str], torch.Tensor] | None = None,
        image_column: str = "identifier",
        caption_column: str = "caption",
        modality_column: str | None = "modality",
        sep: str = ",",
        ct_window: CTWindowArg = DEFAULT_CT_WINDOW,
        on_error: str = "raise",
        error_log_dir: str | Path | None = None,
        max_consecutive_bad: int = 100,
        replacement_seed: int | None = None,
        allow_outside_root: bool = False,
    ):
        self.csv_path = Path(csv_path)
        self.root = None if root is None else Path(root)
        self.allow_outside_root = allow_outside_root
        self.transform = transform
        self.tokenizer = tokenizer
        self.ct_window = ct_window
        self.on_error = check_on_error(on_error)
        if max_consecutive_bad < 1:
            raise ValueError(f"max_consecutive_bad must be >= 1, got {max_consecutive_bad}")
        self.max_consecutive_bad = max_consecutive_bad
        self.replacement_seed = replacement_seed
        required = [image_column]
        if modality_column is not None:
            required.append(modality_column)
        if tokenizer is not None:
            required.append(caption_column)
        table = read_metadata_csv(self.csv_path, required, [caption_column], sep)
        if len(table) == 0:
            raise MedicalImageError(self.csv_path, "metadata CSV has no rows", "list some images")
        # Plain lists: cheap to index and to copy into DataLoader workers.
        self.identifiers = table[image_column].tolist()
        self.modalities = table[modality_column].tolist() if modality_column else [""] * len(table)
        self.captions = (
            table[caption_column].tolist() if caption_column in table else [""] * len(table)
        )
        self.bad_samples = BadSampleLog(error_log_dir if on_error == "skip" else None)
        self._refuse_rows_outside_root()

    def _refuse_rows_outside_root(self, shown: int = 5) -> None:
        """Check every row against the root now, so a bad CSV fails before training, all at once."""
        if self.root is None or self.allow_outside_root:
            return
        dir_cache: dict[str, str] = {}
        refused = []
        for row, identifier in enumerate(self.identifiers):
            try:
                resolve_under_root(self.root, identifier, dir_cache=dir_cache)
            except MedicalImageError as error:
                # the root is named once, in the message's head
                reason = error.reason.removesuffix(f", outside the data root {self.root}")
                refused.append(f"line {row + 2}: {reason}")
        if refused:
            more = f"; and {len(refused) - shown} more" if len(refused) > shown else ""
            raise MedicalImageError(
                self.csv_path,
                f"{len(refused)} row(s) lead outside the data root {self.root}: "
                + "; ".join(refused[:shown]) + more,
                OUTSIDE_ROOT_FIX.format(root=self.root),
            )

    def __len__(self) -> int:
        return len(self.identifiers)

    @property
    def bad_sample_count(self) -> int:
        """Bad samples skipped in this process (with workers, sum ``bad_samples_skipped``)."""
        return self.bad_samples.count

    def load(self, row: int) -> dict[str, Any]:
        """The sample of one CSV row, without any skip policy (raises MedicalImageError)."""
        identifier = self.identifiers[row]
        try:
            # Checked again at read time (cheap next to decoding the image): a symlink may have
            # been placed under the root since the dataset was built.
            path = resolve_under_root(
                self.root, identifier, allow_outside_root=self.allow_outside_root
            )
            sample = build_sample(
                str(path),
                self.modalities[row],
                self.captions[row],
                identifier,
                ct_window=self.ct_window,
                transform=self.transform,
                tokenizer=self.tokenizer,
            )
        except MedicalImageError as error:
            raise error.at_csv_line(self.csv_path, row + 2) from error
        sample["index"] = row
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if self.on_error == "raise":
            sample = self.load(index)
            sample["bad_samples_skipped"] = 0
            return sample
        tried: list[int] = []
        generator = None
        row = index
        while True:
            try:
                sample = self.load(row)
            except MedicalImageError as error:
                self.bad_samples.record(str(self.csv_path), row + 2, self.identifiers[row], error)
                tried.append(row)
                if len(tried) >= min(self.max_consecutive_bad, len(self)):
                    raise MedicalImageError(
                        self.csv_path,
                        f"{len(tried)} bad rows in a row for sample {index} (line {index + 2} and "
                        f"{len(tried) - 1} random replacement(s)); last: {error}",
                        "check the dataset root and the CSV; scripts/data/quality_control.py "
                        "lists bad files",
                    ) from error
                if generator is None:
                    generator = torch.Generator().manual_seed(self._replacement_seed(index))
                row = _draw_untried(len(self), tried, generator)
                continue
            sample["bad_samples_skipped"] = len(tried)
            return sample

    def _replacement_seed(self, index: int) -> int:
        base = torch.initial_seed() if self.replacement_seed is None else self.replacement_seed
        return sample_seed(base, index)


def _draw_untried(size: int, tried: list[int], generator: torch.Generator) -> int:
    """A row drawn uniformly from range(size) minus `tried` (distinct rows)."""
    position = int(torch.randint(size - len(tried), (1,), generator=generator))
    for row in sorted(tried):  # the position-th untried row: step over the tried ones below it
        if position >= row:
            position += 1
    return position
