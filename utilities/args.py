"""Training arguments: one typed dataclass, defaults from SPEC §2, filled from a JSON config file and
then the command line (command line wins). Saved into the run folder and into every checkpoint.

    python train.py --config configs/stage1_tiny_cpu.json --max_steps 50 --batch_size 4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, get_args, get_origin, get_type_hints

from meditok.model import MedITok

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    # --- what to train -------------------------------------------------------------------------
    stage: int = 1  # 1: visual alignment to the BiomedCLIP image trunk; 2: textual alignment to its text tower
    preset: str = "tiny"  # tokenizer preset (meditok.PRESETS): tiny, small, base, large
    img_size: int = 0  # training resolution; 0 = the preset's
    init_from: str = ""  # tokenizer weights to start from (stage 2: stage 1's output or the released weights)
    encoder_init: str = ""  # encoder-only weights (e.g. UniTok) for a stage-1 run from scratch
    # --- data ------------------------------------------------------------------------------------
    train_csv: str = "datasets/meta/examples_train.csv"  # CSV with identifier, caption, modality
    train_root: str = "datasets/examples"  # folder the CSV identifiers are relative to
    train_shards: str = ""  # webdataset shards (brace pattern); used instead of the CSV when set
    csv_sep: str = ","
    image_column: str = "identifier"
    caption_column: str = "caption"
    modality_column: str = "modality"
    on_bad_sample: str = "raise"  # raise: stop naming the file; skip: count, warn, list in bad_samples.csv
    num_workers: int = 2
    # --- schedule --------------------------------------------------------------------------------
    epochs: float = 3.0
    max_steps: int = 0  # stop after this many optimiser steps (0 = epochs decide)
    samples_per_epoch: int = 0  # for shards: samples in one epoch (0 = unknown: needs max_steps)
    batch_size: int = 16  # per process
    grad_accum: int = 1
    # --- tokenizer optimiser (AdamW) ---------------------------------------------------------------
    lr: float = 5e-4
    lr_end: float = 5e-5
    warmup_epochs: float = 0.01
    weight_decay: float = 0.02
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    grad_clip: float = 10.0
    # --- loss weights ----------------------------------------------------------------------------
    l1_weight: float = 0.2
    l2_weight: float = 1.0
    lpips_weight: float = 1.0
    vq_weight: float = 1.0
    adv_weight: float = 0.4  # base of the adaptive GAN weight
    adv_clamp: Tuple[float, float] = (0.015, 1e4)
    contrast_weight: float = -1.0  # -1 = SPEC default for the stage: 0.1 (stage 1), 1.0 (stage 2)
    bcr_weight: float = 4.0
    bcr_cutout: float = 0.2
    diffaug_cutout: float = 0.2
    # --- discriminator (AdamW) -------------------------------------------------------------------
    disc_lr: float = 2e-5
    disc_lr_end: float = 2e-6
    disc_betas: Tuple[float, float] = (0.5, 0.9)
    disc_weight_decay: float = 0.2
    disc_start_epochs: float = 0.0
    disc_warmup_epochs: float = 0.03
    # --- pretrained networks (local paths; hub ids work when online) --------------------------------
    biomedclip: str = ""  # BiomedCLIP folder or hub id ('' = local_openclip default)
    lpips_vgg: str = ""  # VGG16 weights for LPIPS ('' = default path; 'random' only for try-outs)
    dino: str = ""  # DINOv2 ViT-S/14 weights for the discriminator ('' = default path)
    use_lpips: bool = True
    use_disc: bool = True
    use_contrast: bool = True
    # --- runtime ---------------------------------------------------------------------------------
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or fp32 / bf16
    grad_ckpt: bool = False
    grad_ckpt_parts: str = "all"  # what --grad_ckpt recomputes: all | vit (ViT blocks) | decoder_conv (upsampling stages)
    channels_last: bool = False  # NHWC convolutions in the tokenizer and LPIPS (speed only; see docs/performance.md)
    compile: bool = False  # torch.compile the tokenizer's encoder/decoder and the loss networks (eager fallback)
    compile_backend: str = "inductor"  # torch.compile backend ('aot_eager' traces without generating kernels)
    peak_tflops: float = 0.0  # accelerator's peak for the MFU in the logs (0 = known GPUs' bf16 dense peak)
    ema_decay: float = 0.0  # 0 = no EMA weights
    seed: int = 0
    deterministic: bool = False
    # --- output ----------------------------------------------------------------------------------
    output_dir: str = "runs/stage1_tiny"
    resume: str = ""  # '' = fresh run; 'auto' = newest valid checkpoint in output_dir; or a path
    stop_at_step: int = 0  # save and exit after this step (end of a job allocation); continue with --resume auto
    log_every: int = 10
    vis_every: int = 100  # reconstruction grid every N steps and at the end; 0 = none
    save_every: int = 200  # checkpoint every N steps; 0 = only at the end (and on a stop)
    keep_checkpoints: int = 2
    report_wandb: bool = False
    wandb_project: str = "meditok"

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        problems = []
        if self.stage not in (1, 2):
            problems.append(f"--stage must be 1 or 2, got {self.stage}")
        if self.on_bad_sample not in ("raise", "skip"):
            problems.append(f"--on_bad_sample must be 'raise' or 'skip', got {self.on_bad_sample!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.grad_ckpt_parts not in MedITok.CHECKPOINT_PARTS:
            problems.append(f"--grad_ckpt_parts must be {', '.join(MedITok.CHECKPOINT_PARTS[:-1])} or "
                            f"{MedITok.CHECKPOINT_PARTS[-1]}, got {self.grad_ckpt_parts!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("--batch_size and --grad_accum must be ≥ 1")
        if self.log_every < 1:
            problems.append(f"--log_every must be ≥ 1, got {self.log_every}")
        if self.vis_every < 0 or self.save_every < 0:
            problems.append(f"--vis_every and --save_every must be ≥ 0 (0 = off / only at the end), got "
                            f"{self.vis_every} and {self.save_every}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def contrast(self) -> float:
        if self.contrast_weight >= 0:
            return self.contrast_weight
        return 0.1 if self.stage == 1 else 1.0

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "Args":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown argument(s) {unknown}. Valid names: `python train.py --help`.")
        hints = get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k]) for k, v in d.items()})


def _coerce(value: Any, hint: Any) -> Any:
    if get_origin(hint) is tuple:
        return tuple(get_args(hint)[0](v) for v in value)
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def resolve_config_path(name: str) -> Path:
    """`configs/x.json`, `x.json` or `x` (looked up in configs/)."""
    for cand in (Path(name), ROOT / name, ROOT / "configs" / name, ROOT / "configs" / f"{name}.json"):
        if cand.is_file():
            return cand
    available = sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
    raise FileNotFoundError(f"config {name!r} not found (looked in ./ and configs/); available: {available}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the MedITok tokenizer (stage 1: visual alignment; stage 2: textual alignment). "
                    "Values come from the defaults (SPEC §2), then --config, then the command line.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="JSON config: a path or a name in configs/ (e.g. stage1_tiny_cpu); "
                        "values on the command line win over it")
    hints = get_type_hints(Args)
    comments = _field_comments()
    for f in fields(Args):
        hint = hints[f.name]
        kwargs: Dict[str, Any] = {"default": None, "help": f"{comments.get(f.name, '')} (default: {f.default})"}
        if hint is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif get_origin(hint) is tuple:
            kwargs.update(type=get_args(hint)[0], nargs=len(get_args(hint)))
        else:
            kwargs.update(type=hint)
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _field_comments() -> Dict[str, str]:
    """The `# ...` comment after each field above, reused as its --help text."""
    import inspect
    out = {}
    for line in inspect.getsource(Args).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            name = line.split(":", 1)[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> Args:
    ns = build_parser().parse_args(argv)
    values: Dict[str, Any] = {}
    if ns.config:
        path = resolve_config_path(ns.config)
        values.update(json.loads(path.read_text()))
        values.pop("_comment", None)
    for k, v in vars(ns).items():
        if k != "config" and v is not None:
            values[k] = v
    return Args.from_dict(values, source=ns.config or "command line")
