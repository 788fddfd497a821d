"""Rebuild a trained MedITok + language model from a run folder written by ``python -m interpretation.train``.

The vision tower must be the one the run was trained with: the projector and the LoRA adapter learnt *its*
features, so another MedITok gives answers that say nothing about the run. :func:`load_trained` compares the
weights (SHA-256 fingerprint, :func:`generation.token_cache.tokenizer_fingerprint`) of the tower it loads with
the run's: the fingerprint recorded in ``interpretation.json`` (key ``vision_tower_fingerprint``) when the run
has one, else the one of the recorded ``vision_tower`` computed now (when that path, or ``random:<preset>``,
can still be loaded). A different tower is refused unless ``allow_other_vision_tower``.

The model is the run's final artefacts (``interpretation.json``, ``projector.safetensors``, ``lora/``), the same in
run folders of every version; the training checkpoints (``ckpt-{step:08d}.pth``, or an older version's
``ckpt-last.pth``: :mod:`interpretation.loading`) are only for resuming.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .model import MedITokLlava
from .loading import FINGERPRINT_KEY, RUN_FILE, training_checkpoints
from .vision_tower import RANDOM_PREFIX, MedITokVisionTower, load_tokenizer_for_tower


class VisionTowerMismatch(ValueError):
    """The vision tower given is not the one the run was trained with; the message names both and the fix."""


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_vision_tower(tower: MedITokVisionTower, description: Dict[str, Any], description_file: Path,
                       requested: Optional[str], allow_other: bool = False) -> Dict[str, Any]:
    """Compare the loaded tower's weights with the ones the run was trained with.

    Returns ``{"vision_tower", "trained_with", "fingerprint", "trained_fingerprint", "matches", "warning"}``
    (``matches`` None when it cannot be checked: no recorded fingerprint and the recorded tower is gone).
    Raises :class:`VisionTowerMismatch` on different weights unless ``allow_other`` (then ``warning`` says so).
    """
    from meditok import weights_fingerprint as tokenizer_fingerprint

    recorded = str(description["vision_tower"])
    source = requested or recorded
    check: Dict[str, Any] = {"vision_tower": source, "trained_with": recorded, "fingerprint": None,
                             "trained_fingerprint": description.get(FINGERPRINT_KEY), "matches": None,
                             "warning": None}
    expected = check["trained_fingerprint"]
    if expected is None:
        if _same_source(source, recorded):
            check["matches"] = True  # the recorded tower itself; nothing else to compare with
            return check
        if not (recorded.startswith(RANDOM_PREFIX) or Path(recorded).exists()):
            check["warning"] = (f"cannot check --vision-tower {source} against the tower the run was trained with: "
                                f"{description_file} records {recorded}, which is not here, and no "
                                f"{FINGERPRINT_KEY}; make sure they are the same weights")
            print(f"warning: {check['warning']}", file=sys.stderr)
            return check
        reference = load_tokenizer_for_tower(recorded, device="cpu", seed=description.get("seed", 0))
        expected = check["trained_fingerprint"] = tokenizer_fingerprint(reference)
        del reference
    actual = check["fingerprint"] = tokenizer_fingerprint(tower.tokenizer)
    check["matches"] = actual == expected
    if check["matches"]:
        return check
    if requested and not _same_source(requested, recorded):
        problem = (f"--vision-tower {requested} (weights {actual[:16]}) is not the MedITok {description_file} was "
                   f"trained with ({recorded}, weights {expected[:16]})")
        fix = f"pass --vision-tower {recorded} or a copy of it"
    else:
        problem = (f"{source} now holds other weights ({actual[:16]}) than when {description_file} was trained "
                   f"({expected[:16]})")
        fix = "restore them or pass --vision-tower with the original weights"
    if not allow_other:
        raise VisionTowerMismatch(f"{problem}; {fix} (or --allow-other-vision-tower to answer anyway: the answers "
                                  f"then say nothing about this run)")
    check["warning"] = (f"{problem}; evaluated anyway (--allow-other-vision-tower): the answers say nothing about "
                        f"this run")
    print(f"warning: {check['warning']}", file=sys.stderr)
    return check


def load_trained(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 language_model: Optional[str] = None, vision_tower: Optional[str] = None,
                 bf16: bool = False, allow_other_vision_tower: bool = False) -> Tuple[MedITokLlava, Dict[str, Any]]:
    """(model in eval mode, the run's description). ``language_model`` / ``vision_tower`` override the paths
    recorded in the run (e.g. after moving the weights to another machine); a ``vision_tower`` with other
    weights than the run's raises :class:`VisionTowerMismatch` (a ValueError) unless
    ``allow_other_vision_tower``. The description gains ``vision_tower_check`` (see :func:`check_vision_tower`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    description_file = run_dir / RUN_FILE
    if not description_file.is_file():
        checkpoints = training_checkpoints(run_dir)
        unfinished = (f" (it holds the training checkpoint {checkpoints[0].name} of a run that did not finish: "
                      f"continue it with --resume auto; the model is written at its end)" if checkpoints else "")
        raise FileNotFoundError(f"{run_dir}: no {RUN_FILE}{unfinished}; pass the folder of a finished "
                                f"'python -m interpretation.train' run (stage B for question answering)")
    description = json.loads(description_file.read_text())
    device = torch.device(device)
    lm_path = Path(language_model or description["language_model"])
    if not lm_path.is_dir():
        raise FileNotFoundError(f"{lm_path}: the language model recorded in {description_file} is not here; pass "
                                f"--language-model with its current folder")
    tower = MedITokVisionTower.from_source(vision_tower or str(description["vision_tower"]), description["features"],
                                           img_size=description["img_size"], device=device,
                                           dtype=torch.bfloat16 if bf16 else None, seed=description.get("seed", 0))
    description["vision_tower_check"] = check_vision_tower(tower, description, description_file, vision_tower,
                                                           allow_other_vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_path))
    dtype = torch.bfloat16 if bf16 else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(str(lm_path), dtype=dtype).to(device)
    if description.get("lora"):
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(run_dir / description["lora"])).to(device)
    lm.requires_grad_(False)
    model = MedITokLlava(tower, lm, tokenizer, description["projector_type"], description["template"]).to(device)
    model.load_projector(run_dir / description["projector"])
    model.eval()
    return model, description
