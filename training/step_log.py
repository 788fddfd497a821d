"""What a person sees of a run's steps, the same for every trainer: ``metrics.jsonl`` (:class:`MetricsLog`: one
record per logged step, cut back to the resumed step on resume), a console line per record, a progress bar on
terminals (tqdm; off when stderr is not a terminal, as in CI logs and Slurm files) and, when asked, wandb (offline
into the run folder when no API key is configured). Only the main process writes or prints.

    log = StepLog(run_dir, total_steps, start_step, enabled=rank == 0, desc="diffusion")
    for step in range(start_step + 1, total_steps + 1):
        ...
        log.advance()
        if step % log_every == 0:
            log.write({"step": step, "loss": loss, "lr": lr})   # record, console line, wandb
    log.close()

The trainer decides what goes into a record and how its line reads (``line=``; by default ``key value`` pairs).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .metrics import MetricsLog


def format_record(record: Dict[str, Any]) -> str:
    """``key value`` pairs, floats to 4 significant digits."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


class StepLog:
    """metrics.jsonl + console + progress bar + optional wandb of one run (see the module's description).

    Args:
        run_dir: the run folder (``metrics.jsonl`` goes there; wandb's offline files under ``wandb/``).
        total_steps: the run's last step (the progress bar's length).
        start_step: the step the run continues from: records after it are dropped (they are logged again).
        enabled: whether this process writes (the main process).
        desc: the progress bar's label.
        wandb_project: a wandb project name to log to as well ('' / None: no wandb).
        wandb_config: the run's settings, recorded by wandb.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 desc: str = "train", wandb_project: Optional[str] = None,
                 wandb_config: Optional[Dict[str, Any]] = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled)
        self.metrics.truncate_after(start_step)  # a fresh run in a folder that has a log starts it over
        self.progress = None
        self.wandb_run = None
        if not enabled:
            return
        from tqdm import tqdm

        self.progress = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                             disable=not sys.stderr.isatty())
        if wandb_project:
            self.wandb_run = self._start_wandb(wandb_project, wandb_config or {})

    def _start_wandb(self, project: str, settings: Dict[str, Any]):
        import wandb

        if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY") \
                and not (Path.home() / ".netrc").exists():
            os.environ["WANDB_MODE"] = "offline"
            self.print(f"[wandb] no API key configured: logging offline into {self.run_dir / 'wandb'} "
                       f"(`wandb sync` uploads it later; set WANDB_API_KEY or run `wandb login` to log online)")
        return wandb.init(project=project, name=self.run_dir.name, dir=str(self.run_dir), config=settings,
                          id=self.run_dir.name.replace("/", "_"), resume="allow")

    @property
    def path(self) -> Path:
        return self.metrics.path

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def advance(self, steps: int = 1) -> None:
        """A step (or ``steps``) done: the progress bar moves."""
        if self.progress is not None:
            self.progress.update(steps)

    def write(self, record: Dict[str, Any], line: Optional[str] = None, echo: bool = True) -> None:
        """Append ``record`` to metrics.jsonl, log it to wandb (at ``record["step"]``) and print ``line`` (default:
        the record as ``key value`` pairs; nothing with ``echo=False``)."""
        if not self.enabled:
            return
        self.metrics.write(record)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record.get("step"))
        if echo:
            text = format_record(record) if line is None else line
            if self.progress is not None and not self.progress.disable:
                self.progress.set_postfix_str(text.split("| ", 1)[-1][:120])  # past a "step n/N |" prefix
            self.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
