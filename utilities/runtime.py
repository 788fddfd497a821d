"""Process-level setup of a training run and its orderly end: device and process group, determinism,
TF32, and stop requests (SIGTERM from a scheduler, Ctrl-C) honoured at a step boundary."""
from __future__ import annotations

import os
import signal

import torch

from . import dist


def setup_runtime(args) -> torch.device:
    """Join the process group (torchrun), pick the device, set determinism and TF32; seed the networks'
    initialisation (the same on every rank: see ``Trainer`` for the per-rank training streams)."""
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init_distributed(kind)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    return device


class StopRequests:
    """SIGTERM and Ctrl-C set a flag instead of interrupting a step; the loop asks ``should_stop`` between
    steps, so the checkpoint written on a stop holds the data position of the last completed step. A
    second Ctrl-C interrupts at once (KeyboardInterrupt). With several processes the ranks agree at
    logging steps (one small collective there), so all of them save the same step."""

    def __init__(self, args):
        self.args, self.reason, self.exit_code, self._announced = args, "", 0, True
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

    def should_stop(self, step: int, total: int, device: torch.device) -> str:
        """'' to go on, else why to stop now (a signal, or --stop-at-step); never after the last step."""
        if step >= total:
            return ""
        if self.reason and not self._announced and dist.is_main():
            when = "now" if dist.world_size() == 1 else f"at the next logging step (every {self.args.log_every})"
            print(f"\n[train] {self.reason} received: saving and stopping {when} (Ctrl-C again to interrupt at once)",
                  flush=True)
            self._announced = True
        reason = self.reason
        if dist.world_size() > 1:
            if step % self.args.log_every:
                reason = ""
            else:
                flag = torch.tensor(float(bool(reason)), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                reason = (reason or "a stop request on another rank") if flag.item() else ""
        if not reason and self.args.stop_at_step and self.args.stop_at_step <= step:
            reason = "--stop-at-step"
        return reason

    def close(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
