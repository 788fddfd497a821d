"""Stop requests: SIGTERM (Slurm, systemd, ``kill``) and Ctrl-C set a flag instead of interrupting a step; a
trainer asks :meth:`StopRequests.should_stop` between steps, saves the step it finished and exits with
:meth:`StopRequests.exit_code` (143 for SIGTERM, 130 for Ctrl-C, as a shell reports a process killed by them).
A second Ctrl-C interrupts at once (KeyboardInterrupt). With several processes the ranks agree at every
``sync_every``-th step (one small collective there), so all of them save the same step."""
from __future__ import annotations

import signal
from typing import Optional

import torch

from training import distributed

EXIT_SIGTERM, EXIT_CTRL_C = 128 + signal.SIGTERM, 128 + signal.SIGINT  # 143, 130


class StopRequests:
    """Catches SIGTERM/SIGINT for the life of a run (give them back with :meth:`close`).

    ``sync_every``: with several processes, the steps at which the ranks agree on a stop (their logging
    steps; under torchrun, raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT above the time that many steps take, or the
    agent kills the ranks before they save); ``stop_at_step``: stop after exactly this step (the end of a job
    allocation; 0 = never);
    ``name``: the prefix of the one line printed when a signal arrives."""

    def __init__(self, sync_every: int = 1, stop_at_step: int = 0, name: str = "train"):
        self.sync_every, self.stop_at_step, self.name = max(1, int(sync_every)), int(stop_at_step or 0), name
        self.reason, self.exit_code, self._announced = "", 0, True
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        # only set the flag here: printing from a signal handler can re-enter a half-done stdout write
        if signum == signal.SIGINT and self.reason == "Ctrl-C":
            raise KeyboardInterrupt
        self.reason = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        self.exit_code = 128 + signum
        self._announced = False

    def should_stop(self, step: int, total: int, device: Optional[torch.device] = None) -> str:
        """'' to go on, else why to stop now (a signal, or ``stop_at_step``); never after the last step.
        Every rank must call it after every step (a collective runs on the ``sync_every`` steps)."""
        if step >= total:
            return ""
        if self.reason and not self._announced and distributed.is_main():
            world = distributed.world_size()
            when = "now" if world == 1 else f"at the next agreement step (every {self.sync_every})"
            print(f"\n[{self.name}] {self.reason} received: saving and stopping {when} (Ctrl-C again to interrupt "
                  f"at once)", flush=True)
            self._announced = True
        reason = self.reason
        if distributed.world_size() > 1:
            if step % self.sync_every:
                reason = ""
            else:  # every rank stops with the same exit status, also those that got no signal themselves
                code = torch.tensor(float(self.exit_code if reason else 0), device=device)
                torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
                agreed = int(code.item())
                reason = (reason or "a stop request on another rank") if agreed else ""
                self.exit_code = agreed or self.exit_code
        # exactly at that step: a run resumed past it (the same command with --resume auto) goes on
        if not reason and self.stop_at_step and self.stop_at_step == step:
            reason = f"stop at step {self.stop_at_step}"
        return reason

    def final_exit_code(self, stopped: str) -> int:
        """The process's exit status for a run that ended with ``stopped`` ('' = finished): 0 when it finished
        or stopped at the asked step, 143 / 130 when a signal stopped it."""
        if not stopped:
            return 0
        return self.exit_code  # 0 for a stop at the asked step; the agreed signal's status otherwise

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
