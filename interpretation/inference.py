"""Rebuild a trained MedITok + language model from a run folder written by ``python -m interpretation.train``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .model import MedITokLlava
from .train import RUN_FILE
from .vision_tower import MedITokVisionTower


def load_trained(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 language_model: Optional[str] = None, vision_tower: Optional[str] = None,
                 bf16: bool = False) -> Tuple[MedITokLlava, Dict[str, Any]]:
    """(model in eval mode, the run's description). ``language_model`` / ``vision_tower`` override the paths
    recorded in the run (e.g. after moving the weights to another machine)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    description_file = run_dir / RUN_FILE
    if not description_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RUN_FILE}; pass the folder of a finished "
                                f"'python -m interpretation.train' run (stage B for question answering)")
    description = json.loads(description_file.read_text())
    device = torch.device(device)
    lm_path = Path(language_model or description["language_model"])
    if not lm_path.is_dir():
        raise FileNotFoundError(f"{lm_path}: the language model recorded in {description_file} is not here; pass "
                                f"--language-model with its current folder")
    tokenizer = AutoTokenizer.from_pretrained(str(lm_path))
    dtype = torch.bfloat16 if bf16 else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(str(lm_path), dtype=dtype).to(device)
    if description.get("lora"):
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run_dir / description["lora"])).to(device)
    lm.requires_grad_(False)
    tower = MedITokVisionTower.from_source(vision_tower or description["vision_tower"], description["features"],
                                           img_size=description["img_size"], device=device,
                                           dtype=torch.bfloat16 if bf16 else None, seed=description.get("seed", 0))
    model = MedITokLlava(tower, lm, tokenizer, description["projector_type"], description["template"]).to(device)
    model.load_projector(run_dir / description["projector"])
    model.eval()
    return model, description
