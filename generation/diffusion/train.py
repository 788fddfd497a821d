"""Train the joint image–report diffusion model on a token cache (images as MedITok ids + captions).

    python -m generation.diffusion.train --config configs/diffusion_tiny_cpu.json
    torchrun --nproc-per-node 4 -m generation.diffusion.train --config configs/diffusion_b_gpu.json
    python -m generation.diffusion.train --config configs/diffusion_tiny_cpu.json --resume auto

A run folder (``--out``) holds ``ckpt-XXXXXXXX.pth`` (every ``--save-every`` steps, at the end and on a stop; the
newest ``--keep-checkpoints``, each with a ``.sha256``; written, found and restored by the shared
:class:`training.checkpointer.Checkpointer`), ``metrics.jsonl`` (one line per ``--log-every`` steps),
``samples/step_XXXXXXX/`` (text→image grid, joint grid, image→report and joint reports) and ``config.json``.
Runs are exactly resumable: the batches of step s are a function of (seed, s)
(:class:`training.sampler.StepSampler`), its masks and dropout are drawn from seeds of (seed, s, rank), so
``--resume auto`` continues bit-for-bit where the last checkpoint left off. Folders of older runs
(``checkpoints/latest.pt``, ``checkpoints/step_XXXXXXX.pt``) resume too: ``--resume auto`` takes their
``latest.pt`` when no ``ckpt-*.pth`` is there (:data:`generation.diffusion.loading.LEGACY_CHECKPOINTS`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from generation.diffusion.masking import SCHEDULES, MaskSchedule, TaskMix, diffusion_loss
from generation.diffusion.loading import CHECKPOINT_FORMAT, CHECKPOINT_WHAT, LEGACY_CHECKPOINTS, upgrade
from generation.diffusion.model import (PRESETS, DiffusionConfig, DiffusionConfigError, JointDiffusionTransformer,
                                        check_same_architecture, config_from_checkpoint, get_config)
from generation.diffusion.sampler import SamplerOptions, sample
from generation.text import TextCodec, load_text_tokenizer
from training import distributed
from training.checkpointer import Checkpointer, list_checkpoints, nonfinite_names
from training.config import config_file_as_defaults
from training.optim import adamw
from training.options import FAILURES, PRECISIONS, ArgumentParser, UsageError, check_numbers, failure_status
from training.sampler import StepSampler
from training.schedules import cosine_lr, set_lr
from training.step_log import StepLog
from training.stopping import StopRequests
from training.workers import ignore_stop_signals, shutdown_workers

PROG = "python -m generation.diffusion.train"
# arguments that change the data order or the batches: resuming with other values is not exact
ORDER_ARGS = ("seed", "batch_size", "cache")


# --------------------------------------------------------------------------------------------------
# Arguments

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Train the joint image–report masked-diffusion model over MedITok token ids. Values in "
                    "--config (JSON, keys are these flags with '_' for '-') are defaults; flags override them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of defaults: a path or a configs/ name (e.g. "
                                                   "diffusion_tiny_cpu)")
    d = p.add_argument_group("data")
    d.add_argument("--cache", default=None, help="token cache folder (python -m generation.tokenize_dataset)")
    d.add_argument("--text-tokenizer", default=None,
                   help="local HF tokenizer folder for the reports (HF backbone: defaults to the backbone folder)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset")
    m.add_argument("--backbone", default=None, help="preset hf: local folder of a transformers causal LM")
    m.add_argument("--num-layers", type=int, default=None, help="preset hf: keep the first N decoder layers")
    m.add_argument("--text-len", type=int, default=None, help="text budget in tokens (preset default)")
    m.add_argument("--condition-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=200, help="optimiser steps")
    o.add_argument("--batch-size", type=int, default=8, help="samples per process per step")
    o.add_argument("--lr", type=float, default=3e-4)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-steps", type=int, default=20)
    o.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    o.add_argument("--schedule", default="loglinear", choices=SCHEDULES, help="masking schedule α(t)")
    o.add_argument("--text-weight", type=float, default=1.0, help="λ in L_image + λ·L_text")
    o.add_argument("--task-mix", default="1,1,1", help="relative probabilities of joint, image|text, text|image")
    o.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/diffusion", help="run folder")
    r.add_argument("--resume", default="", help="'auto' (the newest usable checkpoint in --out, also checkpoints/"
                                                "latest.pt of older runs), 'restart' (from step 0 in a folder with "
                                                "no usable checkpoint), or a checkpoint path; without it a folder "
                                                "that holds a run is refused")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--save-every", type=int, default=100, help="write ckpt-XXXXXXXX.pth every N steps (and at the "
                                                                 "end and on a stop; 0 = only then)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in --out (and the one "
                                                                    "healthy.json names)")
    r.add_argument("--stop-at-step", type=int, default=0, help="save and stop after this step, exit 0 (the end of a "
                                                                "job allocation; --resume auto goes on; 0 = never)")
    r.add_argument("--sample-every", type=int, default=0, help="write samples every N steps (0 = only at the end)")
    r.add_argument("--sample-steps", type=int, default=16, help="unmasking steps of the samples written in training")
    r.add_argument("--num-samples", type=int, default=4, help="samples per task in the sample folders")
    r.add_argument("--meditok", default=None,
                   help="MedITok checkpoint to decode sample ids into images (default: the cache's tokenizer "
                        "source if it is a file; otherwise ids are saved without images)")
    r.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config_file_as_defaults(parser, pre.config, "diffusion_")
    args = parser.parse_args(argv)
    if args.cache is None:
        raise UsageError("--cache is required (a token cache folder from python -m generation.tokenize_dataset)")
    problems = check_numbers(vars(args), positive=("steps", "batch_size", "lr", "log_every", "sample_steps",
                                                   "keep_checkpoints"),
                             non_negative=("weight_decay", "warmup_steps", "grad_clip", "text_weight", "save_every",
                                           "stop_at_step",
                                           "sample_every", "num_samples", "num_workers", "text_len", "num_layers"),
                             unit_interval=("condition_dropout",))
    try:
        weights = [float(v) for v in str(args.task_mix).split(",")]
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError
    except ValueError:
        problems.append(f"--task-mix must be three weights >= 0 (joint, image|text, text|image), e.g. 1,1,1; "
                        f"got {args.task_mix!r}")
    if problems:
        raise UsageError("; ".join(problems))
    return args


# --------------------------------------------------------------------------------------------------
# Data

class CaptionCollate:
    """dict(ids [8, N], label, caption, ...) items → (text [B, Lt], image [B, 8, N], labels [B])."""

    def __init__(self, codec: TextCodec):
        self.codec = codec

    def __call__(self, items: List[Dict[str, Any]]):
        image = torch.stack([item["ids"] for item in items]).long()
        labels = torch.tensor([int(item["label"]) for item in items], dtype=torch.long)
        text = self.codec.encode([item["caption"] for item in items])
        return text, image, labels


def cache_codebook_size(cache) -> int:
    """Codebook size of the cache's tokenizer (manifest, else its preset's, else MedITok's 4096)."""
    if "codebook_size" in cache.manifest:
        return int(cache.manifest["codebook_size"])
    from meditok.config import PRESETS as MEDITOK_PRESETS
    preset = cache.manifest.get("tokenizer_preset")
    return MEDITOK_PRESETS[preset].codebook_size if preset in MEDITOK_PRESETS else 4096


def open_cache(path: str):
    from generation.token_cache import TokenCache  # the synthesis package's cache (one cache format for both)
    return TokenCache(path)


# --------------------------------------------------------------------------------------------------
# Model, optimiser, schedule

def model_config(args: argparse.Namespace, codec: TextCodec, grid, codebook_size: int, num_codebooks: int,
                 label_names: List[str]) -> DiffusionConfig:
    overrides: Dict[str, Any] = dict(text_vocab_size=codec.vocab_size, grid=tuple(grid), codebook_size=codebook_size,
                                     num_codebooks=num_codebooks, condition_names=list(label_names),
                                     condition_dropout=args.condition_dropout,
                                     grad_checkpointing=bool(args.grad_checkpointing),
                                     text_tokenizer=str(args.text_tokenizer))
    if args.text_len is not None:
        overrides["text_len"] = args.text_len
    if args.backbone is not None:
        overrides["backbone"] = args.backbone
    if args.num_layers is not None:
        overrides["num_layers"] = args.num_layers
    if args.preset != "hf" and args.backbone not in (None, "scratch"):
        raise DiffusionConfigError(f"--backbone {args.backbone} needs --preset hf (preset {args.preset!r} is from scratch)")
    return get_config(args.preset, **overrides)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95); no weight decay on biases, norms, embeddings' 1-d params."""
    return adamw(model.parameters(), lr, weight_decay, (0.9, 0.95))


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10 % of the base rate (the shared schedule)."""
    return cosine_lr(step, total, base, 0.1 * base, warmup)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2 ** 63)


# --------------------------------------------------------------------------------------------------
# Samples written during training

@torch.no_grad()
def write_samples(model: JointDiffusionTransformer, codec: TextCodec, dataset: Dataset, out_dir: Path,
                  num: int, steps: int, seed: int, decoder=None) -> Dict[str, Any]:
    """Text→image from the first ``num`` captions, image→report from their images, ``num`` joint samples.
    Writes ids (.pt), reports (.json) and, with a MedITok ``decoder``, PNG grids."""
    device = next(model.parameters()).device
    items = [dataset[i] for i in range(min(num, len(dataset)))]
    text = codec.encode([it["caption"] for it in items], source="sample captions").to(device)
    image = torch.stack([it["ids"] for it in items]).long().to(device)
    labels = torch.tensor([int(it["label"]) for it in items], device=device)
    options = SamplerOptions(steps=steps)
    g = torch.Generator(device=device).manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, t2i = sample(model, task="text_to_image", labels=labels, text_ids=text, options=options, generator=g)
    i2t, _ = sample(model, task="image_to_text", labels=labels, image_ids=image, options=options, generator=g)
    joint_text, joint_image = sample(model, task="joint", labels=labels, options=options, generator=g)
    torch.save({"text_to_image": t2i.cpu(), "joint_image": joint_image.cpu(), "joint_text": joint_text.cpu()},
               out_dir / "ids.pt")
    names = model.config.condition_names
    reports = {
        "image_to_text": [{"reference": it["caption"], "generated": g_} for it, g_ in zip(items, codec.decode(i2t))],
        "joint": [{"label": names[int(l)] if int(l) < len(names) else "null", "generated": g_}
                  for l, g_ in zip(labels.tolist(), codec.decode(joint_text))],
        "text_to_image_prompts": [it["caption"] for it in items],
    }
    (out_dir / "reports.json").write_text(json.dumps(reports, indent=2) + "\n")
    if decoder is not None:
        from generation.figures import captioned_grid
        grid = model.config.grid
        captions = {"text_to_image": (reports["text_to_image_prompts"], "text → image: the prompt under each image"),
                    "joint": ([r["generated"] for r in reports["joint"]], "joint samples: the generated report under each"),
                    "real": ([it["caption"] for it in items], "real images and their reports")}
        for name, ids in (("text_to_image", t2i), ("joint", joint_image), ("real", image)):
            pixels = decoder.idx_to_img(ids.to(decoder.device), grid).cpu()
            text, title = captions[name]
            captioned_grid((pixels + 1) / 2, text, title, out_dir / f"{name}.png", columns=len(items), min_tile=128)
    return reports


def load_decoder(source: Optional[str], cache, device: torch.device):
    """MedITok to turn sample ids into pixels, checked against the cache's tokenizer fingerprint."""
    candidate = source or cache.manifest.get("tokenizer_source")
    if not candidate or not Path(str(candidate)).exists():
        print(f"[diffusion] no MedITok checkpoint to decode samples ({candidate!r}); sample ids only "
              f"(pass --meditok to get PNG grids)")
        return None
    from meditok import load_meditok
    from generation.token_cache import tokenizer_fingerprint
    decoder = load_meditok(candidate, img_size=cache.img_size).to(device).eval()
    if tokenizer_fingerprint(decoder) != cache.fingerprint:
        raise DiffusionConfigError(f"--meditok {candidate} is not the tokenizer of the cache {cache.path} "
                                   f"(fingerprints differ); pass the checkpoint the cache was made with")
    return decoder


# --------------------------------------------------------------------------------------------------
# Checkpoints: what one holds, and the run folder's shared Checkpointer

class LossWindow:
    """Means of the loss parts over the steps since the last logged one, and the samples/s over them."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.steps, self.samples, self.began = 0, 0, time.perf_counter()

    def add(self, parts: Dict[str, torch.Tensor], samples: int) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.steps, self.samples = self.steps + 1, self.samples + samples

    def record(self, step: int, grad_norm: torch.Tensor, lr: float) -> Dict[str, Any]:
        """The metrics.jsonl record of ``step``; starts a new window."""
        elapsed = time.perf_counter() - self.began
        record = {"step": step, **{k: v / self.steps for k, v in self.sums.items()}, "grad_norm": float(grad_norm),
                  "lr": lr, "samples_per_s": self.samples / max(elapsed, 1e-9)}
        self.__init__()
        return record

    def state_dict(self) -> Dict[str, Any]:
        """Saved with each checkpoint: a run stopped between two logged steps resumes the same averages."""
        return {"sums": dict(self.sums), "steps": self.steps, "samples": self.samples}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if state:  # checkpoints written before the window was saved hold none
            self.sums, self.steps, self.samples = dict(state["sums"]), int(state["steps"]), int(state["samples"])


class DiffusionState:
    """What a checkpoint of this trainer holds, for :class:`training.checkpointer.Checkpointer` (which adds
    ``format``, ``step``, ``ranks`` and ``args``): ``diffusion_config`` (what
    :func:`generation.diffusion.loading.load_for_inference` rebuilds the model from), ``model``, ``optimizer``,
    ``tokenizer_fingerprint`` (the cache's MedITok) and ``loss_window``. Loading refuses (ValueError) a
    checkpoint of another architecture or trained on another MedITok's ids."""

    def __init__(self, model: JointDiffusionTransformer, optimizer: torch.optim.Optimizer, cache,
                 window: LossWindow):
        self.model, self.optimizer, self.cache, self.window = model, optimizer, cache, window

    def state_dict(self) -> Dict[str, Any]:
        return {"diffusion_config": self.model.config.to_dict(),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "tokenizer_fingerprint": self.cache.fingerprint,
                "loss_window": self.window.state_dict()}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        # the Checkpointer names the file: "--resume PATH: the checkpoint was trained with a different model (…)"
        source = "the checkpoint"
        check_same_architecture(config_from_checkpoint(ckpt, source), self.model.config, source)
        if ckpt.get("tokenizer_fingerprint") not in (None, self.cache.fingerprint):
            raise DiffusionConfigError(f"it was trained on ids of another MedITok (fingerprint "
                                       f"{ckpt['tokenizer_fingerprint'][:16]}) than the cache {self.cache.path} "
                                       f"({self.cache.fingerprint[:16]}); resume with the same cache")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.window.load_state_dict(ckpt.get("loss_window"))

    def nonfinite_tensors(self) -> List[str]:
        return nonfinite_names(self.model.state_dict().items())


def checkpointer(args: argparse.Namespace) -> Checkpointer:
    """The run folder's checkpointer (locks ``--out``: every rank calls it, before anything is written)."""
    return Checkpointer(Path(args.out), args.resume, args.keep_checkpoints, CHECKPOINT_FORMAT, CHECKPOINT_WHAT,
                        args=vars(args), order_args=ORDER_ARGS, legacy=LEGACY_CHECKPOINTS, upgrade=upgrade,
                        name="diffusion")


# --------------------------------------------------------------------------------------------------
# The loop

@dataclass
class Run:
    """Everything the loop works on, built by :func:`prepare_run`."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    out: Path
    cache: Any
    codec: TextCodec
    config: DiffusionConfig
    model: JointDiffusionTransformer
    trained: torch.nn.Module            # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    state: DiffusionState               # what a checkpoint holds (model, optimiser, loss window)
    start: int                          # the step to continue from (0 for a fresh run)
    bf16: bool


def resolve_text_tokenizer(args: argparse.Namespace) -> None:
    """``--text-tokenizer`` defaults to the HF backbone's own tokenizer; from-scratch presets need one."""
    if args.text_tokenizer is None:
        if args.preset == "hf" and args.backbone:
            args.text_tokenizer = args.backbone
        else:
            raise DiffusionConfigError("--text-tokenizer is required for from-scratch presets (a local HF tokenizer "
                                       "folder; make one with python -m generation.diffusion.make_tokenizer)")


def prepare_run(args: argparse.Namespace, checkpoints: Checkpointer, device: torch.device) -> Run:
    """Cache, caption codec, model and optimiser, restored (with the loss window) from ``--resume``."""
    rank, world = distributed.rank(), distributed.world_size()
    cache = open_cache(args.cache)
    codec = TextCodec(load_text_tokenizer(args.text_tokenizer), args.text_len or PRESETS[args.preset].text_len)
    config = model_config(args, codec, cache.grid, cache_codebook_size(cache), cache.num_codebooks, cache.label_names)
    torch.manual_seed(args.seed)
    model = JointDiffusionTransformer(config).to(device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    state = DiffusionState(model, optimizer, cache, LossWindow())
    start = checkpoints.restore(state)
    trained = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    run = Run(args, device, rank, world, Path(args.out), cache, codec, config, model, trained, optimizer, state, start,
              bf16)
    checkpoints.write_args()
    if rank == 0:
        (run.out / "config.json").write_text(json.dumps({"model": config.to_dict(), "args": vars(args)}, indent=2)
                                             + "\n")
        print(f"[diffusion] {config.preset} model, {model.num_parameters() / 1e6:.2f} M parameters, "
              f"{model.num_layers} blocks; {len(cache)} samples, text budget {config.text_len}, grid {config.grid}; "
              f"device {device}, world {world}, {'bf16' if bf16 else 'fp32'}")
    return run


def step_batches(run: Run) -> DataLoader:
    """(text, image, labels) of every remaining step, in the order a run from step 0 would see them."""
    args = run.args
    sampler = StepSampler(len(run.cache), args.batch_size, args.seed, run.rank, run.world, run.start, args.steps)
    return DataLoader(run.cache, batch_sampler=sampler, collate_fn=CaptionCollate(run.codec),
                      num_workers=args.num_workers, worker_init_fn=ignore_stop_signals)


def train_step(run: Run, step: int, text: torch.Tensor, image: torch.Tensor, labels: torch.Tensor,
               schedule: MaskSchedule, mix: TaskMix) -> tuple:
    """One optimiser step on this rank's batch of ``step``; returns (loss parts, gradient norm). Its dropout,
    label dropout and masks are drawn from seeds of (seed, step, rank) only, so a resumed run repeats it exactly."""
    args = run.args
    text, image, labels = text.to(run.device), image.to(run.device), labels.to(run.device)
    torch.manual_seed(step_seed(args.seed, step, run.rank))  # dropout & label dropout of this step
    generator = torch.Generator().manual_seed(step_seed(args.seed, step, run.rank) + 1)
    set_lr(run.optimizer, lr_at(step, args.lr, args.warmup_steps, args.steps))
    run.model.train()
    with torch.autocast(run.device.type, dtype=torch.bfloat16) if run.bf16 else nullcontext():
        parts = diffusion_loss(run.trained, text, image, labels, schedule, text_weight=args.text_weight, mix=mix,
                               generator=generator)
    run.optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    # 0 = no clipping (as in the other trainers): the norm is still measured for the log
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip or float("inf"))
    run.optimizer.step()
    return parts, grad_norm


def save_and_sample(run: Run, checkpoints: Checkpointer, step: int, stopped: str) -> None:
    """Every rank: a checkpoint every --save-every steps, at the end and on a stop; rank 0: samples every
    --sample-every steps and at the end."""
    args = run.args
    if (args.save_every and step % args.save_every == 0) or step == args.steps or stopped:
        checkpoints.save(step, run.state)
    if run.rank == 0 and not stopped and args.num_samples and ((args.sample_every and step % args.sample_every == 0)
                                                                or step == args.steps):
        decoder = load_decoder(args.meditok, run.cache, run.device)
        write_samples(run.model, run.codec, run.cache, run.out / "samples" / f"step_{step:07d}", args.num_samples,
                      args.sample_steps, args.seed, decoder)


def train_loop(run: Run, checkpoints: Checkpointer, stops: StopRequests) -> Dict[str, Any]:
    """The steps from ``run.start`` to ``--steps`` (or a stop); returns the step reached, the last logged record
    and why it stopped ('' when it finished)."""
    args = run.args
    schedule, mix = MaskSchedule(args.schedule), TaskMix(*[float(v) for v in str(args.task_mix).split(",")])
    # metrics.jsonl (the steps after the checkpoint are logged again), a console line per record, progress bar
    log = StepLog(run.out, args.steps, run.start, enabled=run.rank == 0, desc="diffusion")
    step, stopped, last, window, batches = run.start, "", {}, run.state.window, None
    try:
        batches = iter(step_batches(run))
        for text, image, labels in batches:
            parts, grad_norm = train_step(run, step, text, image, labels, schedule, mix)
            step += 1
            window.add(parts, text.shape[0] * run.world)
            log.advance()
            if step % args.log_every == 0 or step == args.steps:
                last = window.record(step, grad_norm, run.optimizer.param_groups[0]["lr"])
                log.write(last)
                if math.isfinite(last["loss"]):
                    checkpoints.mark_healthy(step)  # a finite step after the newest checkpoint vouches for it
            stopped = stops.should_stop(step, args.steps, run.device)
            save_and_sample(run, checkpoints, step, stopped)
            if stopped:
                break
    finally:
        shutdown_workers(batches)  # workers ignore SIGTERM: the interpreter would wait for them forever
        log.close()  # before any message, so none is printed onto the bar's line
    return {"step": step, "last": last, "stopped": stopped}


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or resume) training; returns the last logged record, the step reached and the exit status."""
    resolve_text_tokenizer(args)  # before the checkpointer copies the arguments
    device = distributed.init_distributed(args.device)
    checkpoints = stops = None
    try:
        checkpoints = checkpointer(args)  # locks the run folder first
        run = prepare_run(args, checkpoints, device)
        stops = StopRequests(args.log_every, args.stop_at_step, "diffusion")
        summary = train_loop(run, checkpoints, stops)
        if run.rank == 0 and summary["stopped"]:
            print(f"[diffusion] stopped ({summary['stopped']}) at step {summary['step']}/{args.steps}: checkpoint "
                  f"saved; `--resume auto --out {run.out}` continues from here", flush=True)
        if run.rank == 0 and run.codec.truncated:
            print(f"[diffusion] {run.codec.truncated} of {run.codec.seen} captions were truncated to "
                  f"{run.config.text_len} tokens")
        distributed.barrier()
        return {**summary, "truncated": run.codec.truncated, "exit_code": stops.final_exit_code(summary["stopped"])}
    finally:
        for part in (stops, checkpoints):
            if part is not None:
                part.close()
        distributed.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the run finished (or stopped at --stop-at-step), 143 / 130 when SIGTERM / Ctrl-C stopped it (after
    saving), 2 for bad input, 1 when the run cannot go on (a refused run folder or checkpoint, a full disk,
    non-finite weights)."""
    try:
        args = parse_args(argv)
        summary = train(args)
    except FAILURES as error:  # config, cache and tokenizer errors name the fix: exit 2
        return failure_status(PROG, error)
    if not summary["stopped"]:
        newest = next(iter(list_checkpoints(Path(args.out))), None)
        print(f"[diffusion] done: {summary['step']} steps; checkpoint {newest}, samples in "
              f"{Path(args.out) / 'samples'}, metrics in {Path(args.out) / 'metrics.jsonl'}")
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
