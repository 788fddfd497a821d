"""The tokenizer trainer's arguments: one typed dataclass (flags, config files and checks from
``training.config``, shared by every trainer), defaults from docs/method.md §2, filled from a JSON config file and
then the command line (command line wins). Saved into the run folder and into every checkpoint.

    python train.py --config configs/stage1_tiny_cpu.json --max-steps 50 --batch-size 4
"""
from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from meditok.config import PRESETS
from meditok.model import MedITok
from training import config
from training.options import PRECISIONS, ArgumentParser, check_numbers

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    # --- what to train -------------------------------------------------------------------------
    stage: int = 1  # 1: visual alignment to the BiomedCLIP image trunk; 2: textual alignment to its text tower; 3: both in one stage (the ablation of docs/method.md §4)
    preset: str = "tiny"  # tokenizer preset (meditok.PRESETS): tiny, small, base, large
    img_size: int = 0  # training resolution; 0 = the preset's
    init_from: str = ""  # tokenizer weights to start from (stage 2: stage 1's output or the released weights)
    encoder_init: str = ""  # encoder-only weights (e.g. UniTok) for a stage-1 run from scratch
    # --- data ------------------------------------------------------------------------------------
    train_csv: str = "datasets/meta/examples_train.csv"  # CSV with identifier, caption, modality
    train_root: str = "datasets/examples"  # folder the CSV identifiers are relative to
    train_shards: str = ""  # webdataset shards (folder, index.json or brace pattern); used instead of the CSV when set
    vis_csv: str = ""  # images for the reconstruction grids ('' = the training CSV; for shards: the stream's first batch)
    vis_root: str = ""  # folder the --vis-csv identifiers are relative to
    csv_sep: str = ","  # CSV field separator
    image_column: str = "identifier"  # CSV column of image paths
    caption_column: str = "caption"  # CSV column of captions (stage 2)
    modality_column: str = "modality"  # CSV column of modalities (CT windowing, grids)
    allow_outside_root: bool = False  # accept CSV rows (absolute or ../) that resolve outside --train-root / --vis-root
    on_bad_sample: str = "raise"  # raise: stop naming the file; skip: count, warn, list in bad_samples.csv
    num_workers: int = 2  # DataLoader worker processes per training process (0 = load in the training process)
    # --- schedule --------------------------------------------------------------------------------
    epochs: float = 3.0  # passes over the data (docs/method.md §2: 3 in stage 1, 2 in stage 2); --max-steps wins when set
    max_steps: int = 0  # stop after this many optimiser steps (0 = epochs decide)
    samples_per_epoch: int = 0  # for shards: samples in one epoch (0 = unknown: needs max_steps)
    batch_size: int = 16  # per process
    grad_accum: int = 1  # micro-batches per optimiser step (global batch = batch_size × processes × grad_accum)
    # --- tokenizer optimiser (AdamW) ---------------------------------------------------------------
    lr: float = 5e-4  # peak learning rate, after the linear warm-up
    lr_end: float = 5e-5  # cosine floor
    warmup_epochs: float = 0.01  # linear warm-up length, in epochs
    weight_decay: float = 0.02  # AdamW weight decay (not on norms, biases and the logit scale)
    betas: Tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    grad_clip: float = 10.0  # gradient-norm clip of the tokenizer (+ alignment head); 0 = off
    on_nonfinite: str = "stop"  # a step with a NaN/Inf loss or gradient: stop (naming the checkpoint to go back to) or skip it
    max_nonfinite_skips: int = 10  # with --on-nonfinite skip: stop after this many non-finite steps in a row
    # --- loss weights ----------------------------------------------------------------------------
    l1_weight: float = 0.2  # each loss weight: 0 turns the term off (and its network is not built)
    l2_weight: float = 1.0
    lpips_weight: float = 1.0  # LPIPS(VGG16)
    vq_weight: float = 1.0
    adv_weight: float = 0.4  # base of the adaptive GAN weight; 0 = no discriminator
    adv_clamp: Tuple[float, float] = (0.015, 1e4)  # clamp of the ratio ‖∇L_nll‖/‖∇L_adv‖
    contrast_weight: float = -1.0  # -1 = the paper's weight for the stage: 0.1 (stage 1), 1.0 (stage 2); stage 3: the visual term's (0.1); 0 = no teacher
    text_contrast_weight: float = 1.0  # stage 3 only: weight of the textual term (stages 1 and 2 use --contrast-weight)
    contrast_same_targets: str = "negative"  # pairs of one batch with the same target (one caption for two images): negative (the paper's InfoNCE) | masked (left out)
    bcr_weight: float = 4.0  # balanced consistency regularisation of the discriminator
    bcr_cutout: float = 0.2  # cutout of the strong augmentation for BCR
    diffaug_cutout: float = 0.2  # cutout of DiffAugment on the discriminator's inputs
    # --- discriminator (AdamW) -------------------------------------------------------------------
    disc_lr: float = 2e-5  # discriminator heads' peak learning rate (cosine, no warm-up)
    disc_lr_end: float = 2e-6
    disc_betas: Tuple[float, float] = (0.5, 0.9)
    disc_weight_decay: float = 0.2
    disc_start_epochs: float = 0.0  # when the discriminator starts, in epochs
    disc_warmup_epochs: float = 0.03  # warm-up of the adversarial weight after the start, in epochs
    # --- pretrained networks (local paths; hub ids work when online) --------------------------------
    biomedclip: str = ""  # BiomedCLIP folder or hub id ('' = local_openclip default)
    text_teacher: str = ""  # folder or hub id of the text teacher (stages 2, 3) when it is not --biomedclip's text tower ('' = --biomedclip)
    lpips_vgg: str = ""  # VGG16 weights for LPIPS ('' = default path; 'random' only for try-outs)
    dino: str = ""  # DINOv2 ViT-S/14 weights for the discriminator ('' = default path)
    # --- runtime ---------------------------------------------------------------------------------
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or fp32 / bf16
    grad_ckpt: bool = False
    grad_ckpt_parts: str = "all"  # what --grad-ckpt recomputes: all | vit (ViT blocks) | decoder_conv (upsampling stages)
    channels_last: bool = False  # NHWC convolutions in the tokenizer and LPIPS (speed only; see docs/performance.md)
    compile: bool = False  # torch.compile the tokenizer's encoder/decoder and the loss networks (eager fallback)
    compile_form: str = "whole"  # with --compile, the tokenizer's form: whole (one graph per part) | regional (per repeated block: faster to compile)
    upsample: str = ""  # decoder ×2 upsampling form: '' = as built (transposed) | transposed | direct (same parameters and result; docs/performance.md)
    compile_backend: str = "inductor"  # torch.compile backend ('aot_eager' traces without generating kernels)
    peak_tflops: float = 0.0  # accelerator's peak for the MFU in the logs (0 = known GPUs' bf16 dense peak)
    ema_decay: float = 0.0  # 0 = no EMA weights
    seed: int = 0  # initialisation and data order; each rank draws its augmentations from its own stream
    deterministic: bool = False  # deterministic kernels (bit-exact resume; slower)
    # --- output ----------------------------------------------------------------------------------
    output_dir: str = "runs/stage1_tiny"
    resume: str = ""  # '' = fresh run; 'auto' = newest usable checkpoint in output_dir; a checkpoint path; 'restart' = from step 0 over unusable ones
    stop_at_step: int = 0  # save and exit after this step (end of a job allocation); continue with --resume auto
    log_every: int = 10  # console line and metrics.jsonl record every N steps
    vis_every: int = 100  # reconstruction grid every N steps and at the end; 0 = none
    save_every: int = 200  # checkpoint every N steps; 0 = only at the end (and on a stop)
    keep_checkpoints: int = 2  # newest checkpoints kept in the run folder
    report_wandb: bool = False  # log to wandb (offline: WANDB_MODE=offline)
    wandb_project: str = "meditok"  # wandb project name

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        problems = []
        if self.stage not in (1, 2, 3):
            problems.append(f"--stage must be 1, 2 or 3 (both alignments in one stage), got {self.stage}")
        if self.on_bad_sample not in ("raise", "skip"):
            problems.append(f"--on-bad-sample must be 'raise' or 'skip', got {self.on_bad_sample!r}")
        if self.preset not in PRESETS:
            problems.append(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            problems.append(f"--on-nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.contrast_same_targets not in ("negative", "masked"):
            problems.append(f"--contrast-same-targets must be negative or masked, got {self.contrast_same_targets!r}")
        if self.compile_form not in MedITok.COMPILE_FORMS:
            problems.append(f"--compile-form must be {' or '.join(MedITok.COMPILE_FORMS)}, got {self.compile_form!r}")
        if self.upsample not in ("",) + MedITok.UPSAMPLE_FORMS:
            problems.append(f"--upsample must be {' or '.join(MedITok.UPSAMPLE_FORMS)}, got {self.upsample!r}")
        if self.grad_ckpt_parts not in MedITok.CHECKPOINT_PARTS:
            problems.append(f"--grad-ckpt-parts must be {', '.join(MedITok.CHECKPOINT_PARTS[:-1])} or "
                            f"{MedITok.CHECKPOINT_PARTS[-1]}, got {self.grad_ckpt_parts!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append("--batch-size and --grad-accum must be ≥ 1")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            problems.append(f"nothing to train: --max-steps {self.max_steps} and --epochs {self.epochs} (give "
                            f"--max-steps > 0, or --max-steps 0 and --epochs > 0)")
        if self.log_every < 1:
            problems.append(f"--log-every must be ≥ 1, got {self.log_every}")
        if self.vis_every < 0 or self.save_every < 0:
            problems.append(f"--vis-every and --save-every must be ≥ 0 (0 = off / only at the end), got "
                            f"{self.vis_every} and {self.save_every}")
        problems += check_numbers(
            {f.name: getattr(self, f.name) for f in fields(self)},
            positive=("lr", "disc_lr", "keep_checkpoints"),
            non_negative=("img_size", "num_workers", "samples_per_epoch", "lr_end", "disc_lr_end", "warmup_epochs",
                          "weight_decay", "disc_weight_decay", "grad_clip", "max_nonfinite_skips", "l1_weight",
                          "l2_weight", "lpips_weight", "vq_weight", "adv_weight", "text_contrast_weight", "bcr_weight",
                          "disc_start_epochs", "disc_warmup_epochs", "peak_tflops", "stop_at_step"),
            unit_interval=("ema_decay", "bcr_cutout", "diffaug_cutout"))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def contrast(self) -> float:
        """Weight of the stage's contrastive term (stage 3: of its visual term)."""
        if self.contrast_weight >= 0:
            return self.contrast_weight
        return 1.0 if self.stage == 2 else 0.1

    @property
    def vision_contrast(self) -> float:
        """Weight of the contrastive term against the image teacher (0 = no image teacher)."""
        return self.contrast if self.stage in (1, 3) else 0.0

    @property
    def text_contrast(self) -> float:
        """Weight of the contrastive term against the text teacher (0 = no text teacher, no captions read)."""
        return {1: 0.0, 2: self.contrast, 3: self.text_contrast_weight}[self.stage]

    @property
    def text_teacher_source(self) -> str:
        return self.text_teacher or self.biomedclip

    def to_dict(self) -> Dict[str, Any]:
        return config.to_dict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "Args":
        return config.from_dict(cls, _translate_deprecated(dict(d), source), source, "python train.py --help")


# Switches replaced by "weight 0 turns a term off"; saved args.json files and old commands still read.
DEPRECATED_SWITCHES = {"use_lpips": "lpips_weight", "use_disc": "adv_weight", "use_contrast": "contrast_weight"}


def _translate_deprecated(d: Dict[str, Any], source: str) -> Dict[str, Any]:
    for old, weight in DEPRECATED_SWITCHES.items():
        if old not in d:
            continue
        value = d.pop(old)
        on = config.parse_bool(value) if isinstance(value, str) else bool(value)
        if not on:
            d[weight] = 0.0
        warnings.warn(f"{source}: '{old}' is deprecated and will go; use '{weight}' (0 turns the term off)"
                      + ("" if on else f" — read as {weight} = 0"), FutureWarning, stacklevel=3)
    return d


def build_parser() -> argparse.ArgumentParser:
    """Flags are kebab-case (``--batch-size``) like every other CLI of the project; the snake_case spelling
    (``--batch_size``) is accepted as an alias. A bool flag alone means true (``--deterministic``); an
    explicit value works too (``--deterministic false``)."""
    parser = ArgumentParser(
        prog="train.py",
        description="Train the MedITok tokenizer (stage 1: visual alignment; stage 2: textual alignment; "
                    "stage 3: both in one stage, the paper's ablation). "
                    "Values come from the defaults (docs/method.md §2), then --config, then the command line. "
                    "Config files use the snake_case names (batch_size).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="JSON config: a path or a name in configs/ (e.g. stage1_tiny_cpu); "
                        "values on the command line win over it")
    config.add_dataclass_flags(parser, Args, aliases={"output_dir": ["--out"]})  # --out: every other command's
    for old in DEPRECATED_SWITCHES:  # hidden: old commands keep working, with a deprecation message
        parser.add_argument(f"--{old}", f"--{old.replace('_', '-')}", dest=old, default=None, type=config.parse_bool,
                            nargs="?", const=True, help=argparse.SUPPRESS)
    return parser


# Path arguments that a config file in configs/ gives relative to the repository (resolved against it when
# they do not exist relative to the working directory, so train.py runs from any folder).
PATH_ARGS = ("train_csv", "train_root", "train_shards", "vis_csv", "vis_root", "init_from", "encoder_init",
             "biomedclip", "text_teacher", "lpips_vgg", "dino")


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[Dict[str, Any]] = None) -> Args:
    """Args from ``defaults`` (a caller's own, e.g. the step benchmark's), then --config, then the command line.
    A bad value or config file ends with one usage line naming the flag or the file and key (exit 2)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values: Dict[str, Any] = dict(defaults or {})
    try:
        values.update(config.read_config_file(ns.config, "stage", PATH_ARGS, ROOT))
        values.update(config.given(ns))
        return Args.from_dict(values, source=ns.config or "command line")
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
