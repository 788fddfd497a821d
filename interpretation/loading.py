"""The names of a VQA run folder's files and how to read its training checkpoints, without the trainer: what
inference and evaluation import.

``interpretation.train`` writes a run folder: ``interpretation.json`` (:data:`RUN_FILE`, what
:func:`interpretation.inference.load_trained` needs to rebuild the model), ``lora/`` (:data:`LORA_DIR`, stage B's
peft adapter), ``projector.safetensors`` (``interpretation.model.PROJECTOR_FILE``) — the final model, the same in
run folders of every version — and the resumable training state: ``ckpt-{step:08d}.pth`` (format
:data:`CHECKPOINT_FORMAT`, written by the shared :class:`training.checkpointer.Checkpointer`; runs of earlier
versions hold one ``ckpt-last.pth`` instead, :data:`LEGACY_CHECKPOINTS`, which ``--resume auto`` still takes).

A training checkpoint is a plain dict: ``format``, ``stage``, ``trainable`` (name → tensor: the projector, and
the LoRA weights in stage B), ``optimizer``, ``step``, ``ranks`` (per process: its RNG states) and ``args``.
The learning-rate schedule is a function of the step; the ``scheduler`` entry of an old checkpoint is ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

RUN_FILE = "interpretation.json"
LORA_DIR = "lora"
CHECKPOINT_FORMAT = "meditok-interpretation-v1"
CHECKPOINT_WHAT = "VQA training checkpoint"
WEIGHTS_KEY = "trainable"  # the checkpoint entry that must be finite for --resume auto to take a file
LEGACY_CHECKPOINTS = ("ckpt-last.pth",)  # what the trainer wrote before ckpt-{step:08d}.pth
# the key of interpretation.json holding meditok.weights_fingerprint of the tower the run was trained with
FINGERPRINT_KEY = "vision_tower_fingerprint"


def upgrade(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """A ``ckpt-last.pth`` of an earlier version holds one RNG state (``rng``) and no per-rank entries."""
    if "ranks" not in ckpt:
        ckpt["ranks"] = [{"rng": ckpt.get("rng"), "data": None}]
    return ckpt


def reader(run_dir: Path):
    """A :class:`training.checkpointer.CheckpointReader` for a VQA run folder (current and legacy names)."""
    from training.checkpointer import CheckpointReader

    return CheckpointReader(Path(run_dir), (CHECKPOINT_FORMAT,), CHECKPOINT_WHAT, weights_key=WEIGHTS_KEY,
                            legacy=LEGACY_CHECKPOINTS, upgrade=upgrade)


def training_checkpoints(run_dir: Path) -> List[Path]:
    """The run folder's training checkpoints, in the order ``--resume auto`` tries them (newest first, then the
    legacy ``ckpt-last.pth``)."""
    return reader(run_dir).candidates()


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """One VQA training checkpoint (either layout), read safely and brought to the current layout."""
    return reader(Path(path).parent).load(Path(path))
