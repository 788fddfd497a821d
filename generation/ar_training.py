"""The AR generator's training recipe, apart from its trainer: every setting of a run (:class:`TrainConfig`, from a
JSON config file and command-line overrides), the learning rate at a step and the optimiser (paper Table 3:
AdamW (0.9, 0.95), weight decay 0.05, lr 1e-4, constant after an optional warm-up).

The trainer (``python -m generation.train_ar``) and the training-step benchmark
(``benchmarks/synthesis_benchmark.py``) both build on it; nothing here runs a training loop.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from training.optim import adamw
from training.options import PRECISIONS, UsageError, check_field_types, check_numbers, resolve_config
from training.schedules import cosine_lr

from .ar_model import ARConfig


@dataclass
class TrainConfig:
    """Every setting of a run (a JSON config file sets any of them; command-line flags override)."""

    train_cache: str = ""
    val_cache: str = ""
    out: str = "runs/synthesis"
    preset: str = "tiny"
    head: str = "sequential"
    model: Dict[str, Any] = field(default_factory=dict)   # ARConfig overrides (e.g. {"class_dropout": 0.1})
    batch_size: int = 128          # global, over all processes
    epochs: float = 200.0
    max_steps: int = 0             # > 0: stop here instead of after `epochs`
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema: float = 0.0               # EMA decay (0 = off)
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    precision: str = "auto"        # auto: bf16 autocast on a GPU, fp32 on a CPU; or fp32 / bf16
    bf16: bool = True              # older spelling: with precision auto, false keeps a GPU in fp32
    log_every: int = 10
    eval_every: int = 100
    sample_every: int = 0          # 0 = only at the end
    sample_per_label: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    peak_tflops: float = 0.0       # 0: look the GPU up in training.flops.PEAK_BF16_TFLOPS
    resume: str = ""               # "auto" = the newest ckpt in `out`, "restart" = from step 0, or a checkpoint path

    @classmethod
    def from_sources(cls, config_path: Optional[str], overrides: Dict[str, Any]) -> "TrainConfig":
        values: Dict[str, Any] = {}
        if config_path:
            path = resolve_config(config_path, "synthesis_")
            values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
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
