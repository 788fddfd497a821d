"""The one error type of the data pipeline.

Every failure to read an image *correctly* (missing, empty, truncated, not an image, undecodable
DICOM transfer syntax, a `ct` row whose PNG is not 16-bit, a CSV without a required column) raises
:class:`MedicalImageError`, so a trainer can choose between failing fast and skipping bad samples
by catching exactly this type, while programming errors still propagate.
"""

from __future__ import annotations

from pathlib import Path


class MedicalImageError(ValueError):
    """An image (or its metadata) that cannot be read correctly.

    The message names the file, what is wrong with it and, where there is one, what to do;
    the parts are also attributes so callers can log them in columns.

    Attributes:
        path: the image file (or the CSV, for metadata errors), as given.
        reason: what is wrong, including the offending value.
        fix: what the user can do about it, or None.
        csv_path, csv_line: the metadata CSV and its 1-based line (the header is line 1)
            when the image came from a CSV row, else None.
    """

    def __init__(
        self,
        path: str | Path,
        reason: str | None = None,
        fix: str | None = None,
        csv_path: str | Path | None = None,
        csv_line: int | None = None,
    ):
        if reason is None:  # one message: how a DataLoader re-raises a worker's error in the main process
            self._from_worker_message(str(path))
            return
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        self.csv_path = None if csv_path is None else str(csv_path)
        self.csv_line = csv_line
        message = f"{self.path}: {reason}"
        if self.csv_path is not None:
            message += f" (from {self.csv_path} line {csv_line})"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)

    def _from_worker_message(self, text: str) -> None:
        """The DataLoader rebuilds a worker's exception as ``type(message)``, the message holding the worker's
        whole traceback; keep the type (so ``except MedicalImageError`` works across the process boundary)
        and the one line that says what is wrong."""
        lines = [line for line in text.splitlines() if "MedicalImageError: " in line]
        message = lines[-1].split("MedicalImageError: ", 1)[1] if lines else text
        path, _, reason = message.partition(": ")  # "PATH: reason (from CSV line N). Fix: ..."
        self.path, self.reason, self.fix, self.csv_path, self.csv_line = path, reason or message, None, None, None
        super().__init__(message)

    def at_csv_line(self, csv_path: str | Path, csv_line: int) -> "MedicalImageError":
        """The same error, located at a line of a metadata CSV."""
        return MedicalImageError(self.path, self.reason, self.fix, csv_path, csv_line)

    def __reduce__(self):
        # Exceptions are pickled by their args; ours has structured fields, so rebuild from them
        # (needed when the error crosses a process boundary, e.g. a multiprocessing pool).
        return (type(self), (self.path, self.reason, self.fix, self.csv_path, self.csv_line))
