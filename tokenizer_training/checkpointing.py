"""Training checkpoints: what one holds, atomic writes, the run folder, exact resume.

A checkpoint is a plain dict of tensors, numbers, strings and containers (readable with
``torch.load(weights_only=True)``, and by ``meditok.load_meditok`` which finds the tokenizer under
``model``):

    format, config (tokenizer config), model (tokenizer state dict, released names), heads (alignment
    projection f_vision or f_text: its state dict; --stage 3: {"vision": ..., "text": ...}), disc (trainable discriminator heads), optimizer, disc_optimizer, ema (optional),
    step, epoch, ranks (one entry per process: its RNG states and its data position), args

Files are ``ckpt-{step:08d}.pth`` in the run folder, written by :func:`meditok.atomic_write` (temp
file, fsync, rename), so an interrupted save never leaves a half-written checkpoint under a
checkpoint name. :class:`Checkpointer` is the one place that builds, writes, finds and reads them.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import meditok
from meditok.seeding import rng_state, set_rng_state

# the file mechanics every trainer shares; imported here too, as this module's users (and tests) know them
from training.checkpoint_files import (SET_ASIDE_SUFFIX, TEMP_PATTERN, RunFolderLock, atomic_torch_save,
                                       checksum_path, os_error_in, set_aside, verify_checksum)

from training import distributed as dist

CKPT_PATTERN = re.compile(r"^ckpt-(\d{8})\.pth$")
FORMAT = "meditok-train"
HEALTHY_FILE = "healthy.json"  # the newest checkpoint after which training was seen to stay finite


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
    ckpt = meditok.safe_load(path, formats=(FORMAT,), what="MedITok training checkpoint", mmap=True)
    if "ranks" not in ckpt:  # written before per-rank states: one RNG state, a CSV position
        ckpt["ranks"] = [{"rng": ckpt["rng"], "data": {"kind": "csv", "epoch": ckpt["epoch"],
                                                       "batch_in_epoch": ckpt["batch_in_epoch"]}}]
    return ckpt


def set_aside_checkpoints(run_dir: Path) -> List[Path]:
    if not Path(run_dir).is_dir():
        return []
    return sorted(p for p in Path(run_dir).glob(f"ckpt-*.pth{SET_ASIDE_SUFFIX}*") if not p.name.endswith(".sha256"))


def find_resume_checkpoint(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The newest checkpoint in ``run_dir`` that matches its checksum, loads and holds finite weights; the
    others are set aside (renamed ``*.unusable``, never deleted) with a message."""
    for path in list_checkpoints(run_dir):
        try:
            verify_checksum(path)
            ckpt = load_checkpoint(path)
        except Exception as e:  # corrupt/truncated/changed: fall back to the previous one
            set_aside(path, f"unreadable ({type(e).__name__}: {e})")
            continue
        bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            del ckpt
            set_aside(path, f"{len(bad)} tensors hold NaN/Inf (e.g. {bad[0]})")
            continue
        ckpt["_path"] = str(path)
        return ckpt
    return None


def healthy_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint recorded as healthy (finite weights, and a finite loss logged after it), if it exists."""
    record = Path(run_dir) / HEALTHY_FILE
    try:
        path = Path(run_dir) / json.loads(record.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None
    return path if path.is_file() else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and, whatever its age, the one recorded as healthy (set-aside,
    unusable files do not match the checkpoint pattern: never counted, never deleted)."""
    protected = healthy_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[max(keep, 1):]:
        if old != protected:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)


def remove_stale_temp_files(run_dir: Path) -> List[Path]:
    """Temp files of saves that a kill interrupted (only meditok.atomic_write's own pattern), in the run
    folder and its tokenizer folders."""
    removed = []
    for folder in (run_dir, run_dir / "tokenizer", run_dir / "tokenizer_ema"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and TEMP_PATTERN.match(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


class Checkpointer:
    """Owns the run folder and its checkpoints: locks the folder for the run, removes temp files of
    interrupted saves, builds the checkpoint dict from the trainer and the training data of every rank,
    writes it atomically (only from finite weights), prunes old ones (never the one recorded as healthy),
    and restores a run from one.

    Each rank contributes its own RNG states and data position (gathered with one collective at a save),
    so a resumed rank continues its own augmentation stream, not rank 0's."""

    def __init__(self, run_dir: Path, keep: int, args):
        self.run_dir, self.keep, self.args = Path(run_dir), keep, args
        self.lock, refusal = None, None
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.lock = RunFolderLock(self.run_dir)
            except SystemExit as e:
                refusal = str(e)
            else:
                for stale in remove_stale_temp_files(self.run_dir):
                    print(f"[checkpoint] removed {stale}, left by an interrupted save", flush=True)
        refusal = dist.broadcast_from_main(refusal)  # every rank stops together, not only rank 0
        if refusal:
            raise SystemExit(refusal)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _source(self) -> Optional[Dict[str, Any]]:
        """The checkpoint ``--resume`` names, None for a fresh run. Rank 0 decides (verifying checksums and
        setting unusable files aside, once) and tells the others which file to load, or the error to stop with."""
        decision: Any = None
        if dist.is_main():
            try:
                ckpt = self._choose()
                decision = ckpt["_path"] if ckpt is not None else ""
            except SystemExit as e:
                decision = SystemExit(str(e))
        decision = dist.broadcast_from_main(decision)
        if isinstance(decision, SystemExit):
            raise decision
        if not decision:
            return None
        if dist.is_main():
            return ckpt
        ckpt = load_checkpoint(Path(decision))
        ckpt["_path"] = decision
        return ckpt

    def _choose(self) -> Optional[Dict[str, Any]]:
        resume = self.args.resume
        if not resume and (list_checkpoints(self.run_dir) or set_aside_checkpoints(self.run_dir)):
            raise SystemExit(f"{self.run_dir} already holds checkpoints of a run ({(list_checkpoints(self.run_dir) or set_aside_checkpoints(self.run_dir))[0].name})."
                             f" Continue it with --resume auto, or pick another --output-dir (nothing was overwritten).")
        if resume == "restart":
            if list_checkpoints(self.run_dir):
                raise SystemExit(f"--resume restart: {self.run_dir} holds usable checkpoints; continue with --resume "
                                 f"auto, or pick another --output-dir")
            return None
        if resume == "auto":
            ckpt = find_resume_checkpoint(self.run_dir)
            if ckpt is None and set_aside_checkpoints(self.run_dir):
                names = ", ".join(p.name for p in set_aside_checkpoints(self.run_dir))
                raise SystemExit(f"{self.run_dir} had progress but none of its checkpoints is usable ({names}); "
                                 f"nothing was deleted. Resume from a copy you trust with --resume PATH, or start "
                                 f"this run over from step 0 with --resume restart.")
            if ckpt is None and dist.is_main():
                print(f"[resume] no checkpoint in {self.run_dir}: starting fresh", flush=True)
            return ckpt
        if resume:
            path = Path(resume)
            if path.is_dir():
                raise SystemExit(f"--resume {resume} is a folder: use --resume auto --output-dir {resume}, or name a "
                                 f"checkpoint file in it (ckpt-*.pth)")
            if not path.is_file():
                raise SystemExit(f"--resume {resume}: no such checkpoint file")
            try:
                verify_checksum(path)
                ckpt = load_checkpoint(path)
            except (ValueError, RuntimeError, OSError) as e:
                raise SystemExit(f"--resume {resume}: not a usable checkpoint: {e}") from None
            ckpt["_path"] = resume
            return ckpt
        return None

    def restore(self, trainer, data) -> int:
        """Load the checkpoint ``--resume`` asks for into ``trainer`` and ``data`` (and this rank's RNGs);
        returns the step to continue from (0 for a fresh run)."""
        ckpt = self._source()
        if ckpt is None:
            return 0
        try:
            trainer.load_state_dict(ckpt)
        except ValueError as error:  # the trainer's own refusals (e.g. heads of another --stage): one line
            raise SystemExit(f"--resume {ckpt['_path']}: {error}") from None
        self._warn_changed_arguments(ckpt)
        ranks, rank = ckpt["ranks"], dist.rank()
        if len(ranks) != dist.world_size() and dist.is_main():
            print(f"[resume] {ckpt['_path']} was written by {len(ranks)} process(es), this run has "
                  f"{dist.world_size()}: data order and random streams continue approximately, not exactly",
                  flush=True)
        own = ranks[rank % len(ranks)]
        data.load_state_dict(own["data"])
        set_rng_state(own["rng"])
        if dist.is_main():
            print(f"[resume] {ckpt['_path']}: step {ckpt['step']}, epoch {ckpt['epoch']}", flush=True)
        return int(ckpt["step"])

    # arguments that change the data order or the batches: resuming with other values is not exact
    ORDER_ARGS = ("seed", "batch_size", "grad_accum", "train_csv", "train_root", "train_shards", "img_size",
                  "num_workers", "samples_per_epoch")

    def _warn_changed_arguments(self, ckpt: Dict[str, Any]) -> None:
        saved = ckpt.get("args") or {}
        now = self.args.to_dict()
        changed = [f"{k} {saved[k]!r} → {now[k]!r}" for k in self.ORDER_ARGS
                   if k in saved and saved[k] != now[k] and not (k == "num_workers" and not now["train_shards"])]
        if changed and dist.is_main():
            warnings.warn(f"resuming {ckpt['_path']} with arguments that change the data order or the batches: "
                          f"{'; '.join(changed)}. The run continues, but not exactly as it would have.")

    def newest_healthy(self) -> str:
        """For messages: the newest checkpoint to go back to, and how."""
        healthy = healthy_checkpoint(self.run_dir)
        if healthy is not None:
            return (f"the newest healthy checkpoint (a finite loss was logged after it) is {healthy}: continue from "
                    f"it with --resume {healthy}")
        newest = next(iter(list_checkpoints(self.run_dir)), None)
        if newest is None:
            return f"{self.run_dir} holds no checkpoint yet"
        return f"the newest checkpoint is {newest} (not yet vouched for by a finite step): --resume {newest}"

    def mark_healthy(self, step: int) -> None:
        """A finite loss was logged at ``step``: the newest checkpoint at or before it is known to be good."""
        if not dist.is_main():
            return
        good = next((p for p in list_checkpoints(self.run_dir) if int(CKPT_PATTERN.match(p.name).group(1)) <= step),
                    None)
        if good is not None and good != healthy_checkpoint(self.run_dir):
            meditok.atomic_write(self.run_dir / HEALTHY_FILE,
                                 lambda f: f.write(json.dumps({"checkpoint": good.name, "loss_finite_at_step": step})
                                                   .encode()))

    def save(self, step: int, trainer, data) -> Optional[Path]:
        """Write ``ckpt-{step}.pth`` (every rank must call this: the per-rank states are gathered).

        Refuses non-finite weights (one host sync per save), naming the checkpoint to go back to; a disk or
        I/O error ends the run with one message naming the file, the free space and how to continue."""
        bad = trainer.nonfinite_tensors()  # on every rank (the weights are the same), so all of them stop
        if bad:
            raise FloatingPointError(f"step {step}: not saving a checkpoint of non-finite weights ({len(bad)} tensors, "
                                     f"e.g. {', '.join(bad[:3])}); {self.newest_healthy()}. Lower --lr or check the "
                                     f"data.")
        ranks = dist.all_gather_objects({"rng": rng_state(), "data": data.state_dict()})
        failure = path = None
        if dist.is_main():
            path = checkpoint_path(self.run_dir, step)
            state = {"format": FORMAT, **trainer.state_dict(), "step": step, "epoch": data.epoch, "ranks": ranks,
                     "args": self.args.to_dict()}
            try:
                failure = self._write(state, path)
            except BaseException:
                dist.broadcast_from_main("the main process failed to save")
                raise
        failure = dist.broadcast_from_main(failure)
        if failure:
            raise SystemExit(failure)
        return path

    def _write(self, state: Dict[str, Any], path: Path) -> Optional[str]:
        """Write one checkpoint and prune; returns the message for a disk/I-O failure (None when written)."""
        checksum_path(path).unlink(missing_ok=True)  # never leave an old sidecar beside a new file
        try:
            atomic_torch_save(state, path)
        except (OSError, RuntimeError) as error:
            cause = os_error_in(error)
            if cause is None:
                raise
            free = shutil.disk_usage(self.run_dir).free / 1024 ** 3
            what = "the disk is full" if cause.errno == errno.ENOSPC else f"{cause.strerror or cause}"
            previous = next(iter(list_checkpoints(self.run_dir)), None)
            return (f"[checkpoint] could not write {path}: {what} ({free:.2f} GB free on its disk). "
                    + (f"The previous checkpoint {previous} is intact: " if previous else "")
                    + f"free space, then continue with `--resume auto --output-dir {self.run_dir}`.")
        prune_checkpoints(self.run_dir, self.keep)
        return None
