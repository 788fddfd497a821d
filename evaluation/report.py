"""Writing evaluation results: one JSON (everything), one Markdown (the tables), CSVs (rows).

Shared by every evaluation CLI so the files look the same. JSON has no NaN/Infinity: non-finite
numbers are written as null (the Markdown shows them as '–', or '∞' for +inf).
"""
from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch


def to_jsonable(value: Any) -> Any:
    """Numbers, tensors, arrays, paths and containers → plain JSON types (non-finite floats → None)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist() if value.ndim else value.item())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def format_number(value: Any, digits: int = 2) -> str:
    """Markdown cell for a number: fixed digits, '–' for missing/NaN, '∞' for +inf."""
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub Markdown table; numbers formatted with :func:`format_number`."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell if isinstance(cell, str) else format_number(cell, digits) for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Optional[List[str]] = None) -> Path:
    """Rows of dicts → CSV; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["empty"], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return path


def _csv_cell(value: Any) -> Any:
    value = to_jsonable(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Versions and hardware, recorded with every result."""
    import scipy
    import skimage

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "scipy": scipy.__version__, "scikit-image": skimage.__version__, "cpu_threads": torch.get_num_threads()}
    try:
        from importlib.metadata import version

        env["pytorch-fid"] = version("pytorch-fid")
    except Exception:  # not installed as a distribution (e.g. vendored in a path): not worth failing over
        env["pytorch-fid"] = None
    if device is not None:
        env["device"] = str(device)
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_outputs(out_dir: Path, stem: str, payload: Mapping[str, Any], markdown: str,
                  tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> List[Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and one CSV per entry of ``tables`` (``{stem}.csv`` for the key
    ``''``, else ``{stem}_{key}.csv``). Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(out_dir / f"{stem}.json", payload)]
    (out_dir / f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    written.append(out_dir / f"{stem}.md")
    for key, rows in tables.items():
        written.append(write_csv(out_dir / (f"{stem}.csv" if not key else f"{stem}_{key}.csv"), rows))
    return written


def relative(path: Path) -> str:
    """A path as the user would type it: relative when it lies below the working directory, else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())
