"""Check, before anything is built, that every frozen network a training run needs is on disk.

Each loader (``local_openclip.resolve_biomedclip_source``, ``tokenizer_training.perceptual.build_lpips``,
``tokenizer_training.discriminator.build_discriminator``) already refuses a missing file with a message naming it and
the command that gets it, but only when it is reached: after seconds of model building, and one network per
run. ``check_networks(args)`` runs the loaders' own file checks (no model is built, nothing is imported from
open_clip, lpips or transformers) for every network the run's loss weights ask for, and stops with one
message that lists them all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from local_openclip.constants import LPIPS_VGG_PATH, RANDOM_WEIGHTS, default_location

_README = "external/README.md"
_TRY_OUT = "--biomedclip tiny --dino tiny --lpips-vgg random"


def _problem_biomedclip(source: str) -> str:
    from local_openclip.teachers import resolve_biomedclip_source
    try:
        resolve_biomedclip_source(source or None)  # the teacher loaders' own checks: files only
    except (FileNotFoundError, ValueError) as error:
        return str(error)
    return ""


def _problem_lpips_vgg(source: str) -> str:
    from tokenizer_training.perceptual import _HOW_TO_GET
    if source == RANDOM_WEIGHTS:
        return ""
    path = Path(source).expanduser() if source else Path(default_location(LPIPS_VGG_PATH))
    # the same test and message as build_lpips, which would otherwise raise this only after the teacher is built
    return "" if path.is_file() else f"LPIPS VGG16 weights not found: {path}; {_HOW_TO_GET}."


def _problem_dino(source: str) -> str:
    from tokenizer_training.discriminator import _timm_create_arguments
    try:
        _timm_create_arguments(source or None)  # build_discriminator's own file checks, no model built
    except (FileNotFoundError, ValueError) as error:
        return str(error)
    return ""


def missing_networks(args: Any) -> List[str]:
    """One line per required network whose files are missing or unusable (empty: all present).

    ``args``: the training arguments (``tokenizer_training.args.Args`` or any object with ``vision_contrast``,
    ``text_contrast``, ``lpips_weight``, ``adv_weight``, ``biomedclip``, ``text_teacher_source``,
    ``lpips_vgg`` and ``dino``). A network is required when its loss weight is > 0; a Hub id (``hf-hub:...``)
    is not checked (it is fetched when loaded); a folder already reported is not reported twice.
    """
    checks = (
        ("BiomedCLIP image teacher", "vision_contrast", "--contrast-weight", "biomedclip", "--biomedclip",
         _problem_biomedclip),
        ("text teacher", "text_contrast", "--contrast-weight / --text-contrast-weight", "text_teacher_source",
         "--text-teacher (default: --biomedclip)", _problem_biomedclip),
        ("LPIPS VGG16", "lpips_weight", "--lpips-weight", "lpips_vgg", "--lpips-vgg", _problem_lpips_vgg),
        ("DINOv2 discriminator", "adv_weight", "--adv-weight", "dino", "--dino", _problem_dino),
    )
    problems, checked = [], set()
    for what, weight_name, weight_flag, source_name, source_flag, find_problem in checks:
        weight = float(getattr(args, weight_name))
        source = str(getattr(args, source_name) or "")
        if weight <= 0 or source.startswith("hf-hub:") or (find_problem, source) in checked:
            continue
        checked.add((find_problem, source))
        problem = find_problem(source)
        if problem:
            problems.append(f"{what} (needed because {weight_flag} is {weight:g}; {source_flag} "
                            f"{source or 'default'}): {problem}")
    return problems


def check_networks(args: Any) -> None:
    """Raise one ``SystemExit`` listing every missing network of this run (see ``missing_networks``); else None."""
    problems = missing_networks(args)
    if not problems:
        return
    lines = [f"{len(problems)} pretrained network{'s' if len(problems) > 1 else ''} this run needs "
             f"{'are' if len(problems) > 1 else 'is'} missing (nothing was built):"]
    lines += [f"  {i}. {p}" for i, p in enumerate(problems, 1)]
    lines.append(f"Where each file goes and the commands that fetch them: {_README}. For a try-out without them: "
                 f"{_TRY_OUT} (tiny random stand-ins: `python scripts/make_tiny_networks.py`), or set the loss weight "
                 f"to 0.")
    raise SystemExit("\n".join(lines))
