"""The tokenizer trainer's checkpoints: what one holds, and the run folder's :class:`training.Checkpointer` set
up for it.

A checkpoint is a plain dict of tensors, numbers, strings and containers (readable with
``torch.load(weights_only=True)``, and by ``meditok.load_meditok`` which finds the tokenizer under
``model``):

    format, config (tokenizer config), model (tokenizer state dict, released names), heads (alignment
    projection f_vision or f_text: its state dict; --stage 3: {"vision": ..., "text": ...}), disc (trainable
    discriminator heads), optimizer, disc_optimizer, ema (optional), step, epoch, ranks (one entry per process:
    its RNG states and its data position), args

Files are ``ckpt-{step:08d}.pth`` in the run folder; writing, finding, checking and restoring them is the
shared :class:`training.checkpointer.Checkpointer`'s work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from training.checkpointer import Checkpointer, CheckpointReader, list_checkpoints

FORMAT = "meditok-train"
WHAT = "MedITok training checkpoint"

# arguments that change the data order or the batches: resuming with other values is not exact
ORDER_ARGS = ("seed", "batch_size", "grad_accum", "train_csv", "train_root", "train_shards", "img_size",
              "num_workers", "samples_per_epoch")


def upgrade(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Checkpoints written before per-rank states hold one RNG state and a CSV position."""
    if "ranks" not in ckpt:
        ckpt["ranks"] = [{"rng": ckpt["rng"], "data": {"kind": "csv", "epoch": ckpt["epoch"],
                                                       "batch_in_epoch": ckpt["batch_in_epoch"]}}]
    return ckpt


def checkpointer(args, run_dir: Optional[Path] = None, resume: Optional[str] = None) -> Checkpointer:
    """The run folder's checkpointer for ``args`` (locks the folder: call it first)."""
    order = tuple(k for k in ORDER_ARGS if k != "num_workers" or args.train_shards)  # workers split shards only
    return Checkpointer(Path(run_dir or args.output_dir), args.resume if resume is None else resume,
                        args.keep_checkpoints, FORMAT, WHAT, args=args.to_dict(),
                        order_args=order, upgrade=upgrade, temp_dirs=("tokenizer", "tokenizer_ema"),
                        out_flag="--output-dir")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """One tokenizer training checkpoint, read safely (memory-mapped: a ``large`` one with its optimiser
    states is ~8.5 GB)."""
    return CheckpointReader(Path(path).parent, (FORMAT,), WHAT, upgrade=upgrade).load(path)


def find_resume_checkpoint(run_dir: Path) -> Optional[Dict[str, Any]]:
    """What ``--resume auto`` takes in ``run_dir`` (the others on the way are set aside), without locking it."""
    return CheckpointReader(run_dir, (FORMAT,), WHAT, upgrade=upgrade).newest_usable()


__all__ = ["FORMAT", "ORDER_ARGS", "checkpointer", "find_resume_checkpoint", "list_checkpoints", "load_checkpoint",
           "upgrade"]
