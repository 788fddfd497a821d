"""Checkpoint files, for every trainer: atomic writes with a SHA-256 sidecar, checksum verification, setting an
unusable file aside (never deleting it, never replacing an earlier set-aside), an OS lock on a run folder, and
the OS error behind a failed save (a full disk)."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

import meditok

from .options import RunError  # noqa: F401  (raised here; defined with the other command errors)

# meditok.atomic_write's temp files: ".<final name>.<8 random chars>.tmp"
TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
LOCK_FILE = ".lock"


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (torch.save writes its zip sequentially)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` through :func:`meditok.atomic_write`, then ``<path>.sha256`` beside it (the format of
    ``sha256sum``, so ``sha256sum -c ckpt-*.pth.sha256`` checks it too). Returns the hex digest."""
    digest = {}

    def write(f) -> None:
        hashing = _HashingWriter(f)
        torch.save(obj, hashing)
        digest["hex"] = hashing.sha256.hexdigest()
    meditok.atomic_write(path, write)
    meditok.atomic_write(checksum_path(path), lambda f: f.write(f"{digest['hex']}  {Path(path).name}\n".encode()))
    return digest["hex"]


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def verify_checksum(path: Path) -> None:
    """Raise ValueError when ``path`` no longer matches the checksum written with it (no sidecar: nothing to
    check, as for checkpoints written before checksums)."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return
    expected = sidecar.read_text().split()[0]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            sha.update(chunk)
    if sha.hexdigest() != expected:
        raise ValueError(f"its contents do not match {sidecar.name} (sha256 {sha.hexdigest()[:12]}… vs "
                         f"{expected[:12]}…): the file was changed or damaged after it was written")


SET_ASIDE_SUFFIX = ".unusable"


def set_aside_name(path: Path) -> Path:
    """``<name>.unusable``, or ``<name>.unusable.2``, ``.3``, … when an earlier file was set aside under that name
    (a run that failed twice at the same step): a set-aside never replaces another one."""
    path = Path(path)
    target, n = path.with_name(path.name + SET_ASIDE_SUFFIX), 1
    while target.exists() or checksum_path(target).exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}.{n}")
    return target


def set_aside(path: Path, why: str) -> Path:
    """Rename an unusable checkpoint (never delete it: it may be rescued by hand) out of the checkpoint
    pattern, so that neither resume nor pruning counts it; an earlier set-aside of the same name is kept."""
    target = set_aside_name(path)
    os.rename(path, target)  # the target does not exist (checked above; one trainer per folder holds the lock)
    if checksum_path(path).exists():
        os.rename(checksum_path(path), checksum_path(target))
    warnings.warn(f"setting aside checkpoint {path} → {target.name}: {why}")
    return target


class RunFolderLock:
    """An OS lock (flock) on ``<run>/.lock`` held for the life of a run, so a second trainer on the same
    folder stops at once instead of overwriting the first one's checkpoints. The OS releases it when the
    holder exits or dies, so ``--resume auto`` after a crash just proceeds."""

    def __init__(self, run_dir: Path, out_flag: str = "--out"):
        import fcntl
        self.path = Path(run_dir) / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(self._fd)
            raise RunError(f"{Path(run_dir)} is in use by a running trainer ({holder}); stop it first or pick "
                           f"another {out_flag} (nothing was changed)") from None
        except OSError as e:  # a file system without flock (some NFS / Lustre mounts): run unprotected
            warnings.warn(f"cannot lock {self.path} ({e.strerror}): a second trainer on this folder would not be "
                          f"stopped")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind an exception (torch.save wraps it in a RuntimeError), if any."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
