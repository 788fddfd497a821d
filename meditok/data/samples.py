"""Pieces shared by the CSV and sharded datasets: metadata CSVs, turning a row into a training
sample, and the bad-sample log."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .errors import MedicalImageError
from .reading import CTWindowArg, normalise_modality, read_image

logger = logging.getLogger("meditok.data")

ON_ERROR_POLICIES = ("raise", "skip")
BAD_SAMPLES_FILE = "bad_samples.csv"
BAD_SAMPLES_COLUMNS = ("source", "line_or_key", "identifier", "path", "reason")


def read_metadata_csv(
    csv_path: str | Path,
    required_columns: list[str],
    optional_columns: list[str] = (),
    sep: str = ",",
    keep_all_columns: bool = False,
) -> pd.DataFrame:
    """Read a metadata CSV as strings (empty cells -> ''), checking the required columns.

    Returns the required and present optional columns, or every column with keep_all_columns.

    Raises:
        MedicalImageError: missing/unparsable file, a missing required column (the message lists
            the columns present), or empty cells in the first required column (the identifier).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MedicalImageError(csv_path, "metadata CSV not found",
                                "check the path given for it (train.py: --train-csv / --vis-csv; the evaluation "
                                "and data tools: --csv)")
    try:
        table = pd.read_csv(csv_path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise MedicalImageError(
            csv_path,
            f"cannot parse the metadata CSV ({error})",
            "it must be a delimited text file with a header row",
        ) from error
    missing = [c for c in required_columns if c not in table.columns]
    if missing:
        hint = ""
        if len(table.columns) == 1 and any(ch in table.columns[0] for ch in ";\t|"):
            hint = f"; the header looks delimited by something other than {sep!r}: pass sep="
        raise MedicalImageError(
            csv_path,
            f"missing required column(s) {missing}; columns present: {list(table.columns)}",
            "rename the column in the CSV or pass its name (image_column=, caption_column=, "
            f"modality_column=){hint}",
        )
    identifier_column = required_columns[0]
    empty = table.index[table[identifier_column].str.strip() == ""].tolist()
    if empty:
        lines = [i + 2 for i in empty[:5]]
        raise MedicalImageError(
            csv_path,
            f"{len(empty)} row(s) with an empty {identifier_column!r}, at line(s) {lines}",
            "fill in or delete those rows",
        )
    if keep_all_columns:
        return table
    keep = list(required_columns) + [c for c in optional_columns if c in table.columns]
    return table[list(dict.fromkeys(keep))]


def resolve_identifier(identifier: str, root: str | Path | None) -> Path:
    """Absolute identifiers as they are; relative ones under `root` (or the working directory)."""
    path = Path(identifier.strip())
    if path.is_absolute() or root is None:
        return path
    return Path(root) / path


def build_sample(
    name: str,
    modality: str,
    caption: str,
    identifier: str,
    *,
    ct_window: CTWindowArg,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    tokenizer: Callable[[str], torch.Tensor] | None,
    data: bytes | None = None,
) -> dict[str, Any]:
    """Read and transform one image; tokenize its caption if a tokenizer is given.

    Returns a dict: image (float [3, H, W] in [-1, 1]), modality, caption, identifier, and text
    (the tokenizer's output, a leading batch dimension of 1 removed) when a tokenizer is given.
    """
    modality = normalise_modality(modality) or ""
    window = ct_window if modality == "ct" else None
    image = read_image(name, modality or None, window, data=data)
    if transform is not None:
        image = transform(image)
    sample = {"image": image, "modality": modality, "caption": caption, "identifier": identifier}
    if tokenizer is not None:
        if not caption.strip():
            raise MedicalImageError(
                name,
                "empty caption, but a tokenizer was given (image-text training)",
                "fill in the caption or drop the row",
            )
        text = tokenizer(caption)
        # open_clip-style tokenizers return [1, context]; the DataLoader adds the batch dim.
        if isinstance(text, torch.Tensor) and text.ndim == 2 and text.shape[0] == 1:
            text = text[0]
        sample["text"] = text
    return sample


class BadSampleLog:
    """Counts bad samples in this process and appends them to ``<log_dir>/bad_samples.csv``.

    Columns: source (CSV or shard), line_or_key (CSV line, 1-based with the header as line 1, or
    the shard sample key), identifier, path, reason. Each row is written with one O_APPEND write,
    so DataLoader workers and ranks sharing a folder do not interleave lines. The same file may
    be listed more than once: once per worker and epoch that met it.
    """

    def __init__(self, log_dir: str | Path | None):
        self.count = 0
        self.path = None if log_dir is None else Path(log_dir) / BAD_SAMPLES_FILE
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # Exclusive create: exactly one process (of all ranks) writes the header.
                with open(self.path, "x", newline="") as handle:
                    csv.writer(handle).writerow(BAD_SAMPLES_COLUMNS)
            except FileExistsError:
                pass

    def record(
        self, source: str, line_or_key: str | int, identifier: str, error: MedicalImageError
    ):
        self.count += 1
        logger.warning(
            "skipped bad sample %s (%s:%s): %s [%d skipped in this process]",
            identifier,
            source,
            line_or_key,
            error.reason,
            self.count,
        )
        if self.path is None:
            return
        buffer = io.StringIO()
        csv.writer(buffer).writerow([source, line_or_key, identifier, error.path, error.reason])
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, buffer.getvalue().encode())
        finally:
            os.close(descriptor)


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    return on_error
