"""The names of a VQA run folder's files, without the trainer: what inference and evaluation import.

``interpretation.train`` writes a run folder: ``interpretation.json`` (:data:`RUN_FILE`, what
:func:`interpretation.inference.load_trained` needs to rebuild the model), ``lora/`` (:data:`LORA_DIR`, stage B's
peft adapter), ``projector.safetensors`` (``interpretation.model.PROJECTOR_FILE``) and ``ckpt-last.pth``
(:data:`CHECKPOINT`, the resumable training state, format :data:`CHECKPOINT_FORMAT`).
"""
from __future__ import annotations

RUN_FILE = "interpretation.json"
CHECKPOINT = "ckpt-last.pth"
LORA_DIR = "lora"
CHECKPOINT_FORMAT = "meditok-interpretation-v1"
# the key of interpretation.json holding meditok.weights_fingerprint of the tower the run was trained with
FINGERPRINT_KEY = "vision_tower_fingerprint"
