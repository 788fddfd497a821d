"""Load a joint-diffusion checkpoint, without the trainer: what samplers and evaluators import.

``generation.diffusion.sample`` and ``evaluation.diffusion`` rebuild a trained model from here, given a
checkpoint file or a run folder; ``generation.diffusion.train`` writes the checkpoints (format
:data:`CHECKPOINT_FORMAT`) through the shared :class:`training.checkpointer.Checkpointer` with the same
:data:`LEGACY_CHECKPOINTS` names and :func:`upgrade`.

A run folder holds ``ckpt-{step:08d}.pth`` (each with a ``.sha256`` beside it); runs written before the shared
checkpointer hold ``checkpoints/latest.pt`` (the newest) and ``checkpoints/step_XXXXXXX.pt``. Both are read:
a folder's model is its newest usable checkpoint of the current scheme, else its ``latest.pt``, else its
newest ``step_*.pt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

from generation.diffusion.model import JointDiffusionTransformer, config_from_checkpoint
from generation.text import TextCodec, load_text_tokenizer
from training.checkpoint_files import verify_checksum
from training.checkpointer import CheckpointReader

CHECKPOINT_FORMAT = "meditok-joint-diffusion-v1"
CHECKPOINT_WHAT = "joint-diffusion checkpoint"
# checkpoints the trainer wrote before the shared checkpointer, newest first (relative to the run folder)
LEGACY_CHECKPOINTS = ("checkpoints/latest.pt", "checkpoints/step_*.pt")


def upgrade(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Checkpoints of the old layout hold no per-rank states: every random draw of a step comes from seeds of
    (seed, step, rank) and the batches from the step, so there is nothing per rank to restore (``ranks`` empty);
    the oldest also lack the loss window (``loss_window`` None: the window starts empty)."""
    ckpt.setdefault("ranks", [])
    ckpt.setdefault("loss_window", None)
    return ckpt


def reader(run_dir: Union[str, Path]) -> CheckpointReader:
    """The read-only side of a diffusion run folder's checkpoints (both layouts)."""
    return CheckpointReader(Path(run_dir), (CHECKPOINT_FORMAT,), CHECKPOINT_WHAT, legacy=LEGACY_CHECKPOINTS,
                            upgrade=upgrade, set_aside_unusable=False)  # a trainer may hold the folder


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """One checkpoint file (either layout), checked against its checksum and read safely; or, for a run folder,
    its newest usable checkpoint (unusable ones on the way are skipped with a warning; nothing in the folder
    changes). The file read is under ``_path``."""
    path = Path(path)
    if path.is_dir():
        ckpt = reader(path).newest_usable()
        if ckpt is None:
            raise FileNotFoundError(f"{path} holds no usable diffusion checkpoint (ckpt-*.pth, or "
                                    f"checkpoints/latest.pt of older runs); pass a checkpoint file or a run folder "
                                    f"written by python -m generation.diffusion.train")
        return ckpt
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a ckpt-*.pth file or the run folder "
                                f"(--out of the trainer: its newest checkpoint is taken)")
    verify_checksum(path)
    ckpt = reader(path.parent).load(path)
    ckpt["_path"] = str(path)
    return ckpt


def load_for_inference(path, device="cpu"):
    """A checkpoint file or run folder → (model in eval mode, TextCodec, payload); ``payload["_path"]`` names
    the file read."""
    payload = load_checkpoint(path)
    config = config_from_checkpoint(payload, payload["_path"])
    model = JointDiffusionTransformer(config)
    model.load_state_dict(payload["model"])
    codec = TextCodec(load_text_tokenizer(config.text_tokenizer), config.text_len)
    return model.to(device).eval(), codec, payload
