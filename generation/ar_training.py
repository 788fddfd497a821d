"""The AR generator's training recipe, apart from its trainer: every setting of a run (:class:`TrainConfig`, from a
JSON config file and command-line overrides), the learning rate at a step and the optimiser (paper Table 3:
AdamW (0.9, 0.95), weight decay 0.05, lr 1e-4, constant after an optional warm-up).

The trainer (``python -m generation.train_ar``) and the training-step benchmark
(``benchmarks/synthesis_benchmark.py``) both build on it; nothing here runs a training loop.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from training.optim import adamw
from training import config
from training.options import PRECISIONS, UsageError, check_field_types, check_numbers
from training.schedules import cosine_lr

from .ar_model import ARConfig


@dataclass
class TrainConfig:
    """Every setting of a run (a JSON config file sets any of them; command-line flags override)."""

    train_cache: str = ""  # token cache to train on (python -m generation.tokenize_dataset)
    val_cache: str = ""  # token cache for the validation loss (same tokenizer; labels mapped by name)
    out: str = "runs/synthesis"  # run folder
    preset: str = "tiny"  # generator preset: tiny, B (paper), L, XL
    head: str = "sequential"  # sequential (code k from codes < k, the released variant) or independent (8 heads)
    model: Dict[str, Any] = field(default_factory=dict)  # generator config overrides, e.g. {"class_dropout": 0.1}
    batch_size: int = 128  # global batch over all processes (paper 128)
    epochs: float = 200.0  # epochs over the training cache (paper 200)
    max_steps: int = 0  # stop after this many steps instead (0 = use --epochs)
    lr: float = 1e-4  # learning rate (paper 1e-4)
    beta1: float = 0.9  # AdamW beta1 (0.9)
    beta2: float = 0.95  # AdamW beta2 (0.95)
    weight_decay: float = 0.05  # AdamW weight decay (paper 0.05)
    warmup_steps: int = 0  # linear lr warm-up steps (0 = none)
    grad_clip: float = 1.0  # gradient-norm clip (0 = off)
    ema: float = 0.0  # EMA decay of the weights, e.g. 0.9999 (0 = off)
    seed: int = 0  # seed of data order, class dropout and initialisation
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on a CPU), fp32 or bf16
    bf16: bool = True  # older spelling of --precision: false keeps a GPU in fp32 under --precision auto
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 100  # steps between validation losses (0 = at the end only)
    sample_every: int = 0  # steps between sample grids (0 = at the end only)
    sample_per_label: int = 8  # images per label in each sample grid
    save_every: int = 500  # steps between checkpoints (0 = at the end and on a stop only)
    keep_checkpoints: int = 2  # checkpoints kept
    peak_tflops: float = 0.0  # accelerator peak for MFU (0 = look the GPU up in training.flops.PEAK_BF16_TFLOPS)
    resume: str = ""  # 'auto' (newest checkpoint in --out), 'restart' (from step 0) or a checkpoint path

    @classmethod
    def from_sources(cls, config_path: Optional[str], overrides: Dict[str, Any]) -> "TrainConfig":
        values = config.read_config_file(config_path or "", "synthesis_")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        problems = check_field_types(values, cls) + check_numbers(
            values, positive=("batch_size", "epochs", "lr", "log_every", "keep_checkpoints"),
            non_negative=("max_steps", "warmup_steps", "grad_clip", "weight_decay", "eval_every", "sample_every",
                          "sample_per_label", "save_every", "peak_tflops"),
            unit_interval=("beta1", "beta2", "ema"))
        problems += model_override_problems(values.get("model") or {})
        if values.get("precision", "auto") not in PRECISIONS:
            problems.append(f"--precision must be {', '.join(PRECISIONS)}, got {values['precision']!r}")
        if problems:
            raise UsageError("; ".join(problems))
        return cls(**values)


# set from the token cache (or by --preset / --head), never through --model
CACHE_SET_FIELDS = ("preset", "head", "grid", "num_labels", "num_codebooks", "codebook_size")


def model_override_problems(model: Any) -> List[str]:
    """What is wrong with a --model override: not a JSON object, an unknown ARConfig field, or a field the token
    cache decides."""
    if not isinstance(model, dict):
        return [f"--model must be a JSON object of generator settings, got {model!r}"]
    known = {f.name for f in dataclasses.fields(ARConfig)}
    problems = [f"--model: unknown generator setting {k!r} (known: {', '.join(sorted(known - set(CACHE_SET_FIELDS)))})"
                for k in model if k not in known]
    problems += [f"--model: {k!r} is set by the token cache (or --preset / --head), not by --model" for k in model
                 if k in CACHE_SET_FIELDS]
    return problems


def learning_rate(config: TrainConfig, step: int) -> float:
    """Constant lr (the paper's), after an optional linear warm-up: the shared schedule with its floor at the peak."""
    return cosine_lr(step, 0, config.lr, config.lr, config.warmup_steps)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms' gains), as LlamaGen does."""
    return adamw(model.parameters(), config.lr, config.weight_decay, (config.beta1, config.beta2), fused=False)


__all__ = ["CACHE_SET_FIELDS", "TrainConfig", "learning_rate", "make_optimizer", "model_override_problems"]
