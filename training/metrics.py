"""``metrics.jsonl``, the one metrics file of every trainer: one JSON object per logged step, appended (so a crash
loses at most the line being written), and cut back to the resumed step when a run resumes (the steps after its
checkpoint are logged again), so a stopped-and-resumed run's file equals an unbroken run's."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import meditok


class MetricsLog:
    """Appends records to ``path`` (only where ``enabled``: the main process)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step`` (0: none, for a run that starts afresh in a used folder)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        meditok.atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
