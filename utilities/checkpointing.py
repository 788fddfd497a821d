"""Training checkpoints: atomic writes, RNG states, exact resume.

A checkpoint is a plain dict of tensors, numbers, strings and containers (readable with
``torch.load(weights_only=True)``, and by ``meditok.load_meditok`` which finds the tokenizer under
``model``):

    format, config (tokenizer config), model (tokenizer state dict, released names), heads (alignment
    projections), disc (trainable discriminator heads), optimizer, disc_optimizer, ema (optional),
    step, epoch, batch_in_epoch, rng, args

Files are ``ckpt-{step:08d}.pth`` in the run folder, written to a temp file, fsynced and renamed, so
an interrupted save never leaves a half-written checkpoint under a checkpoint name.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^ckpt-(\d{8})\.pth$")
FORMAT = "meditok-train"


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state):
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pth"


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoints in ``run_dir``, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CKPT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_PATTERN.match(p.name).group(1)), reverse=True)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    # memory-mapped: a `large` checkpoint (model + optimiser states, ~8.5 GB) is not copied into RAM first
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MedITok training checkpoint (format {ckpt.get('format')!r})")
    return ckpt


def find_resume_checkpoint(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The newest checkpoint in ``run_dir`` that loads; unreadable ones are reported and skipped."""
    for path in list_checkpoints(run_dir):
        try:
            ckpt = load_checkpoint(path)
            ckpt["_path"] = str(path)
            return ckpt
        except Exception as e:  # corrupt/truncated: fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[max(keep, 1):]:
        old.unlink(missing_ok=True)
