"""Ending data-loader worker processes before the process that owns them ends.

Our workers ignore SIGTERM/SIGINT (so that a scheduler's signal to the whole process group reaches only the
trainer, which saves first). At interpreter shutdown ``multiprocessing``'s exit handler sends workers SIGTERM
and then waits for them: workers that ignore it are waited for forever, and a run that printed its last line
never exits (after a failure and, when a reference cycle keeps the loader alive, after success too). Every
trainer therefore shuts its loaders' workers down in ``finally`` with :func:`shutdown_workers`."""
from __future__ import annotations

import signal
from typing import Any


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the trainer, so a scheduler's signal to the
    whole process group (Slurm, systemd, Ctrl-C) does not kill a worker before the trainer has finished its step
    and saved; the trainer ends them with :func:`shutdown_workers`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_workers(*loaders_or_iterators: Any) -> None:
    """Stop the worker processes of DataLoaders and/or their iterators (persistent ones included); safe to
    call more than once, on ``None`` and on loaders without workers."""
    for obj in loaders_or_iterators:
        if obj is None:
            continue
        iterators = [obj, getattr(obj, "_iterator", None)]  # a DataLoader keeps its persistent iterator there
        for it in iterators:
            stop = getattr(it, "_shutdown_workers", None)
            if stop is not None:
                stop()
        if hasattr(obj, "_iterator"):
            obj._iterator = None
