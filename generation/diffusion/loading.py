"""Load a joint-diffusion checkpoint, without the trainer: what samplers and evaluators import.

``generation.diffusion.sample`` and ``evaluation.diffusion`` rebuild a trained model from here;
``generation.diffusion.train`` writes the checkpoints (format :data:`CHECKPOINT_FORMAT`) and reads them back
for ``--resume`` with the same :func:`load_checkpoint`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from generation.diffusion.model import JointDiffusionTransformer, config_from_checkpoint
from generation.text import TextCodec, load_text_tokenizer
from meditok import safe_load

CHECKPOINT_FORMAT = "meditok-joint-diffusion-v1"


def load_checkpoint(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; use --resume auto or a file in <out>/checkpoints/")
    return safe_load(path, formats=(CHECKPOINT_FORMAT,), what="joint-diffusion checkpoint")


def load_for_inference(path, device="cpu"):
    """A checkpoint → (model in eval mode, TextCodec, payload)."""
    payload = load_checkpoint(Path(path))
    config = config_from_checkpoint(payload, str(path))
    model = JointDiffusionTransformer(config)
    model.load_state_dict(payload["model"])
    codec = TextCodec(load_text_tokenizer(config.text_tokenizer), config.text_len)
    return model.to(device).eval(), codec, payload
