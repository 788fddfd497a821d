"""The run folder's checkpoints, for every trainer (tokenizer, AR generator, diffusion model, VQA model).

One naming scheme, ``ckpt-{step:08d}.pth`` in the run folder, and one behaviour:

- the folder is locked for the life of a run (:class:`training.checkpoint_files.RunFolderLock`), and temp files
  of saves a kill interrupted are removed;
- a checkpoint is a plain dict (``torch.load(weights_only=True)`` reads it) written atomically with a SHA-256
  sidecar, only from finite weights; the newest ``keep`` are kept, and always the one recorded in
  ``healthy.json`` (a finite loss was logged after it);
- each rank contributes its RNG states and, when it has one, its data position (``ranks``), so a resumed rank
  continues its own streams;
- ``--resume auto`` takes the newest checkpoint that matches its checksum, loads and holds finite weights; any
  other is set aside (renamed ``*.unusable``, never deleted) with a message. ``--resume restart`` starts over
  only when no usable checkpoint would be lost; ``--resume PATH`` takes that file; no ``--resume`` refuses a
  folder that already holds a run.

A trainer hands over its state as an object with ``state_dict() -> dict`` (merged into the checkpoint),
``load_state_dict(checkpoint)`` and ``nonfinite_tensors() -> [names]``; its data, when its position is not a
function of the step, as an object with ``state_dict()`` / ``load_state_dict(state)``.

Checkpoints the trainers wrote before this scheme (``checkpoints/latest.pt`` and ``step_*.pt`` of the diffusion
trainer, ``ckpt-last.pth`` of the VQA trainer) are found by ``--resume auto`` as ``legacy`` names, after every
checkpoint of the current scheme; they are never pruned. The AR trainer's older 7-digit ``ckpt-*.pth`` names
match the current pattern and are read (and pruned) like the 8-digit ones; files without a checksum sidecar
are read unverified.

Failures are exceptions, never ``SystemExit``: :class:`RunError` (a refusal or a failed save, one line naming
the file and what to do), which every trainer's ``main`` prints and turns into exit status 1.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

import meditok
from meditok.seeding import rng_state, set_rng_state

from . import distributed as dist
from .checkpoint_files import (SET_ASIDE_SUFFIX, TEMP_PATTERN, RunError, RunFolderLock, atomic_torch_save,
                               checksum_path, os_error_in, set_aside, verify_checksum)

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pth$")
CURRENT_NAME = re.compile(r"^ckpt-\d{8}\.pth$")  # what this version writes (older: 7 digits, legacy names)
HEALTHY_FILE = "healthy.json"  # the newest checkpoint after which training was seen to stay finite


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pth"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a ``ckpt-*.pth`` name, None for any other name."""
    match = CKPT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoints of the current scheme in ``run_dir``, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CKPT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def legacy_checkpoints(run_dir: Path, patterns: Sequence[str]) -> List[Path]:
    """Files matching ``patterns`` (globs relative to ``run_dir``, in order of preference), each pattern's
    matches newest name first."""
    found: List[Path] = []
    for pattern in patterns:
        found += sorted((p for p in Path(run_dir).glob(pattern) if p.is_file()), reverse=True)
    return found


def set_aside_checkpoints(run_dir: Path) -> List[Path]:
    if not Path(run_dir).is_dir():
        return []
    return sorted(p for p in Path(run_dir).rglob(f"*{SET_ASIDE_SUFFIX}*") if not p.name.endswith(".sha256"))


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
    unusable files and legacy names do not match the checkpoint pattern: never counted, never deleted)."""
    protected = healthy_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[max(keep, 1):]:
        if old != protected:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)


def remove_stale_temp_files(folders: Iterable[Path]) -> List[Path]:
    """Temp files of saves that a kill interrupted (only meditok.atomic_write's own pattern) in ``folders``."""
    removed = []
    for folder in folders:
        if Path(folder).is_dir():
            for p in Path(folder).iterdir():
                if p.is_file() and TEMP_PATTERN.match(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def nonfinite_names(named: Iterable[tuple]) -> List[str]:
    """Names of the floating-point tensors among ``(name, tensor)`` pairs that hold NaN/Inf (one host sync)."""
    named = [(k, v) for k, v in named if torch.is_tensor(v) and v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()
    return [k for (k, _), ok in zip(named, finite.tolist()) if not ok]


class CheckpointReader:
    """The reading side of a run folder's checkpoints (no lock): loading one safely, the candidates of
    ``--resume auto`` and the newest usable one. With ``set_aside_unusable`` (the trainer's side, which holds the
    folder's lock) unusable files met on the way are renamed aside; without it (samplers and evaluators reading a
    folder a trainer may hold) they are skipped with a warning and nothing in the folder changes."""

    def __init__(self, run_dir: Path, formats: Sequence[str], what: str, *, weights_key: str = "model",
                 legacy: Sequence[str] = (),
                 upgrade: Optional[Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]] = None,
                 set_aside_unusable: bool = True):
        self.run_dir, self.formats, self.what = Path(run_dir), tuple(formats), what
        self.weights_key, self.legacy, self.upgrade = weights_key, tuple(legacy), upgrade
        self.set_aside_unusable = set_aside_unusable

    def load(self, path: Path) -> Dict[str, Any]:
        """One checkpoint, read safely (memory-mapped) and brought to the current layout."""
        ckpt = meditok.safe_load(path, formats=self.formats, what=self.what, mmap=True)
        if self.upgrade is not None:
            ckpt = self.upgrade(ckpt) or ckpt
        return ckpt

    def candidates(self) -> List[Path]:
        """Checkpoints ``--resume auto`` may take, in the order it tries them."""
        return list_checkpoints(self.run_dir) + legacy_checkpoints(self.run_dir, self.legacy)

    def newest_usable(self) -> Optional[Dict[str, Any]]:
        """The newest checkpoint that matches its checksum, loads and holds finite weights; the others on the
        way are set aside (or skipped). A file that pickles Python objects stops the search where it is
        (:class:`meditok.UnsafeCheckpointError`, naming the one-time conversion): an older checkpoint of this
        project is one, and a renamed file could no longer be converted and resumed."""
        for path in self.candidates():
            try:
                verify_checksum(path)
                ckpt = self.load(path)
            except meditok.UnsafeCheckpointError:
                raise
            except Exception as e:  # corrupt/truncated/changed: fall back to the previous one
                self._pass_over(path, f"unreadable ({type(e).__name__}: {e})")
                continue
            bad = nonfinite_names((ckpt.get(self.weights_key) or {}).items())
            if bad:
                del ckpt
                self._pass_over(path, f"{len(bad)} tensors hold NaN/Inf (e.g. {bad[0]})")
                continue
            ckpt["_path"] = str(path)
            return ckpt
        return None

    def _pass_over(self, path: Path, why: str) -> None:
        if self.set_aside_unusable:
            set_aside(path, why)
        else:
            warnings.warn(f"skipping checkpoint {path}: {why}")


class Checkpointer(CheckpointReader):
    """Owns a run folder's checkpoints (see the module's description).

    Args:
        run_dir: the run folder (created, then locked by rank 0).
        resume: ``''`` (a fresh run; refuses a folder holding one), ``'auto'``, ``'restart'`` or a file path.
        keep: how many checkpoints of the current scheme to keep.
        fmt: the ``format`` value written into every checkpoint (``formats``: those accepted on reading,
            default ``(fmt,)``); ``what`` names the kind of file in messages.
        args: the run's arguments as a dict (saved in every checkpoint; compared on resume for ``order_args``,
            the arguments that change the data order or the batches).
        weights_key: the checkpoint entry whose tensors must be finite for ``--resume auto`` to use it.
        legacy: globs (relative to the run folder) of checkpoints older trainers wrote, in order of preference.
        upgrade: turns a checkpoint read from disk into the current layout (old files), in place or returned.
        temp_dirs: subfolders (besides the run folder) where interrupted saves may have left temp files.
        out_flag: the command-line flag naming the run folder, for messages.
    """

    def __init__(self, run_dir: Path, resume: str, keep: int, fmt: str, what: str, *,
                 args: Optional[Dict[str, Any]] = None, formats: Optional[Sequence[str]] = None,
                 order_args: Sequence[str] = (), weights_key: str = "model", legacy: Sequence[str] = (),
                 upgrade: Optional[Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]] = None,
                 temp_dirs: Sequence[str] = (), out_flag: str = "--out", name: str = "checkpoint"):
        super().__init__(run_dir, formats or (fmt,), what, weights_key=weights_key, legacy=legacy, upgrade=upgrade)
        self.resume = "" if resume in (None, "", "none") else resume  # "none": the diffusion trainer's old spelling
        self.keep, self.fmt = keep, fmt
        self.args, self.order_args, self.out_flag, self.name = dict(args or {}), tuple(order_args), out_flag, name
        self.lock, refusal = None, None
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.lock = RunFolderLock(self.run_dir, out_flag)
            except RunError as e:
                refusal = str(e)
            else:
                folders = [self.run_dir] + [self.run_dir / d for d in temp_dirs]
                for stale in remove_stale_temp_files(folders):
                    print(f"[{name}] removed {stale}, left by an interrupted save", flush=True)
        refusal = dist.broadcast_from_main(refusal)  # every rank stops together, not only rank 0
        if refusal:
            raise RunError(refusal)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _choose(self) -> Optional[Dict[str, Any]]:
        resume, here = self.resume, self.run_dir
        if not resume:
            held = self.candidates() or set_aside_checkpoints(here)
            if held:
                raise RunError(f"{here} already holds checkpoints of a run ({held[0].name}). Continue it with "
                               f"--resume auto, or pick another {self.out_flag} (nothing was overwritten).")
            return None
        if resume == "restart":
            if self.candidates():
                raise RunError(f"--resume restart: {here} holds usable checkpoints; continue with --resume auto, "
                               f"or pick another {self.out_flag}")
            return None
        if resume == "auto":
            try:
                ckpt = self.newest_usable()
            except meditok.UnsafeCheckpointError as error:
                raise RunError(f"--resume auto: {error} Nothing was renamed or deleted.") from None
            if ckpt is None and set_aside_checkpoints(here):
                names = ", ".join(p.name for p in set_aside_checkpoints(here))
                raise RunError(f"{here} had progress but none of its checkpoints is usable ({names}); nothing was "
                               f"deleted. Resume from a copy you trust with --resume PATH, or start this run over "
                               f"from step 0 with --resume restart.")
            if ckpt is None:
                print(f"[resume] no checkpoint in {here}: starting fresh", flush=True)
            return ckpt
        path = Path(resume)
        if path.is_dir():
            raise RunError(f"--resume {resume} is a folder: use --resume auto {self.out_flag} {resume}, or name a "
                           f"checkpoint file in it (ckpt-*.pth)")
        if not path.is_file():
            raise RunError(f"--resume {resume}: no such checkpoint file (--resume auto takes the newest in {here})")
        try:
            verify_checksum(path)
            ckpt = self.load(path)
        except (ValueError, RuntimeError, OSError) as e:
            raise RunError(f"--resume {resume}: not a usable checkpoint: {e}") from None
        ckpt["_path"] = resume
        return ckpt

    def source(self) -> Optional[Dict[str, Any]]:
        """The checkpoint ``--resume`` names, None for a fresh run. Rank 0 decides (verifying checksums and
        setting unusable files aside, once) and tells the others which file to load, or the error to stop with."""
        decision: Any = None
        ckpt = None
        if dist.is_main():
            try:
                ckpt = self._choose()
                decision = ckpt["_path"] if ckpt is not None else ""
            except RunError as e:
                decision = RunError(str(e))
            except BaseException:  # anything else: the other ranks stop too instead of waiting for a decision
                dist.broadcast_from_main(RunError("the main process failed while choosing the checkpoint"))
                raise
        decision = dist.broadcast_from_main(decision)
        if isinstance(decision, RunError):
            raise decision
        if not decision:
            return None
        if dist.is_main():
            return ckpt
        ckpt = self.load(Path(decision))
        ckpt["_path"] = decision
        return ckpt

    def restore(self, state, data=None) -> int:
        """Load the checkpoint ``--resume`` asks for into ``state`` and ``data`` (and this rank's RNGs); returns
        the step to continue from (0 for a fresh run)."""
        ckpt = self.source()
        if ckpt is None:
            return 0
        try:
            state.load_state_dict(ckpt)
        except ValueError as error:  # the trainer's own refusals (e.g. heads of another stage): one line
            raise RunError(f"--resume {ckpt['_path']}: {error}") from None
        self._warn_changed_arguments(ckpt)
        ranks = ckpt.get("ranks") or []
        if ranks:
            if len(ranks) != dist.world_size() and dist.is_main():
                print(f"[resume] {ckpt['_path']} was written by {len(ranks)} process(es), this run has "
                      f"{dist.world_size()}: data order and random streams continue approximately, not exactly",
                      flush=True)
            own = ranks[dist.rank() % len(ranks)]
            if data is not None and own.get("data") is not None:
                data.load_state_dict(own["data"])
            if own.get("rng") is not None:
                set_rng_state(own["rng"])
        if dist.is_main():
            epoch = f", epoch {ckpt['epoch']}" if "epoch" in ckpt else ""
            print(f"[resume] {ckpt['_path']}: step {ckpt['step']}{epoch}", flush=True)
            if not CURRENT_NAME.match(Path(ckpt["_path"]).name):
                print(f"[resume] {Path(ckpt['_path']).name} was written by an earlier version of this trainer, whose "
                      f"data order differed: the weights, optimiser and step continue, the batches from here on are "
                      f"this version's (not exactly those the old run would have read)", flush=True)
        return int(ckpt["step"])

    def _warn_changed_arguments(self, ckpt: Dict[str, Any]) -> None:
        saved = ckpt.get("args") or {}
        changed = [f"{k} {saved[k]!r} → {self.args[k]!r}" for k in self.order_args
                   if k in saved and k in self.args and saved[k] != self.args[k]]
        if changed and dist.is_main():
            warnings.warn(f"resuming {ckpt['_path']} with arguments that change the data order or the batches: "
                          f"{'; '.join(changed)}. The run continues, but not exactly as it would have.")

    def write_args(self) -> None:
        """``args.json`` in the run folder (main process): the run's arguments, as every checkpoint records them."""
        if dist.is_main():
            text = json.dumps(self.args, indent=2, default=str) + "\n"
            meditok.atomic_write(self.run_dir / "args.json", lambda f: f.write(text.encode()))

    # ---------------------------------------------------------------------------------------------- health
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
        good = next((p for p in list_checkpoints(self.run_dir) if checkpoint_step(p) <= step), None)
        if good is not None and good != healthy_checkpoint(self.run_dir):
            meditok.atomic_write(self.run_dir / HEALTHY_FILE,
                                 lambda f: f.write(json.dumps({"checkpoint": good.name, "loss_finite_at_step": step})
                                                   .encode()))

    # ---------------------------------------------------------------------------------------------- writing
    def save(self, step: int, state, data=None) -> Optional[Path]:
        """Write ``ckpt-{step:08d}.pth`` (every rank must call this: the per-rank states are gathered); returns
        its path on rank 0.

        Refuses non-finite weights, naming the checkpoint to go back to (FloatingPointError); a disk or I/O
        error ends the run with one message naming the file, the free space and how to continue (RunError)."""
        bad = state.nonfinite_tensors()  # on every rank (the weights are the same), so all of them stop
        if bad:
            raise FloatingPointError(f"step {step}: not saving a checkpoint of non-finite weights ({len(bad)} tensors, "
                                     f"e.g. {', '.join(bad[:3])}); {self.newest_healthy()}. Lower the learning "
                                     f"rate or check the data.")
        own = {"rng": rng_state(), "data": data.state_dict() if data is not None else None}
        ranks = dist.all_gather_objects(own)
        failure = path = None
        if dist.is_main():
            path = checkpoint_path(self.run_dir, step)
            try:
                payload = {"format": self.fmt, **state.state_dict(), "step": step, "ranks": ranks, "args": self.args}
                if data is not None and hasattr(data, "epoch"):
                    payload["epoch"] = data.epoch
                failure = self._write(payload, path)
            except BaseException:
                dist.broadcast_from_main("the main process failed to save")
                raise
        failure = dist.broadcast_from_main(failure)
        if failure:
            raise RunError(failure)
        return path

    def _write(self, payload: Dict[str, Any], path: Path) -> Optional[str]:
        """Write one checkpoint and prune; returns the message for a disk/I-O failure (None when written)."""
        checksum_path(path).unlink(missing_ok=True)  # never leave an old sidecar beside a new file
        try:
            atomic_torch_save(payload, path)
        except (OSError, RuntimeError) as error:
            cause = os_error_in(error)
            if cause is None:
                raise
            free = shutil.disk_usage(self.run_dir).free / 1024 ** 3
            what = "the disk is full" if cause.errno == errno.ENOSPC else f"{cause.strerror or cause}"
            previous = next(iter(list_checkpoints(self.run_dir)), None)
            return (f"[{self.name}] could not write {path}: {what} ({free:.2f} GB free on its disk). "
                    + (f"The previous checkpoint {previous} is intact: " if previous else "")
                    + f"free space, then continue with `--resume auto {self.out_flag} {self.run_dir}`.")
        prune_checkpoints(self.run_dir, self.keep)
        return None
