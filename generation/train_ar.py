"""Train the autoregressive generator on a token cache (paper Table 3 recipe: AdamW (0.9, 0.95), weight decay
0.05, lr 1e-4, batch 128, 200 epochs, class dropout for CFG).

Examples::

    python -m generation.train_ar --config configs/synthesis_tiny_cpu.json          # minutes on a CPU
    torchrun --nproc_per_node 8 -m generation.train_ar --config configs/synthesis_B_h100.json \\
        --train-cache runs/tokens/medmnist_train --val-cache runs/tokens/medmnist_val
    python -m generation.train_ar --config ... --resume auto                          # continue a stopped run

A run folder holds ``metrics.jsonl`` (loss, lr, images/s, tokens/s, MFU; val loss every --eval-every),
``ckpt-{step:08d}.pth`` (atomic, each with a ``.sha256`` beside it; the last --keep-checkpoints and the one
``healthy.json`` names), ``samples/step-*/grid_<label>.png`` every --sample-every steps, ``baselines.json`` (the
unigram code distribution's cross-entropy on the validation cache), ``loss_curves.png``, ``config.json`` (resolved
settings) and the final ``generator.pth`` (load with ``generation.ar_model.load_generator``; sample with
``python -m generation.sample``).

The loop is made of named parts: :class:`TokenBatches` (which rows each step and rank reads: the shared
:class:`training.sampler.StepSampler`), :class:`TrainingState` (what a checkpoint holds) saved and restored by
the run folder's :class:`training.checkpointer.Checkpointer` (the folder locked, checksums, ``--resume
auto|restart|PATH``, each rank's RNG states), :class:`RunLogger` (metrics.jsonl, console, plot) and
:class:`SampleGrids` (decoded samples per label). Resuming is exact: the batch of step s and its class-dropout
draws depend only on (seed, s), and model, EMA, optimizer and RNG states are restored. Run folders of the
earlier 7-digit ``ckpt-*.pth`` names resume from their weights, optimiser and step, but not bit-for-bit (their
data order was another one; the resume says so). The settings, the learning rate and the optimiser are
:mod:`generation.ar_training`'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from training import config, distributed
from training.checkpoint_files import atomic_torch_save
from training.checkpointer import Checkpointer, nonfinite_names
from training.flops import peak_flops
from training.step_log import StepLog
from training.options import FAILURES, ArgumentParser, UsageError, failure_status
from training.sampler import StepSampler
from training.schedules import set_lr
from training.stopping import StopRequests
from .ar_model import GENERATOR_FORMAT, ARConfig, ARGenerator, count_training_flops, generator_payload, get_ar_config
from .ar_training import TrainConfig, learning_rate, make_optimizer
from .token_cache import TokenCache, check_same_tokenizer

PROG = "python -m generation.train_ar"

__all__ = ["TrainConfig", "TokenBatches", "TrainingState", "learning_rate", "main", "make_optimizer", "train",
           "unigram_baselines"]


# --------------------------------------------------------------------------------------------------
# Data

class TokenBatches:
    """Which cache rows each step reads, :class:`training.sampler.StepSampler` over the cache (a permutation per
    epoch seeded by (seed, epoch), full global batches only, each rank taking its contiguous slice), and
    ``class_dropout_uniform(step)``, the global batch's class-dropout draws sliced the same way: both pure
    functions of (seed, step), so a resumed run reads what an unbroken one would and N processes train exactly
    like one."""

    def __init__(self, cache: TokenCache, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if len(cache) < global_batch:
            raise ValueError(f"{cache.path}: {len(cache)} rows, fewer than one batch of {global_batch}; lower --batch-size")
        self.cache, self.global_batch, self.seed = cache, global_batch, seed
        self.rank, self.local_batch = rank, global_batch // world_size
        self.sampler = StepSampler(len(cache), self.local_batch, seed, rank, world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def global_indices(self, step: int) -> List[int]:
        """The rows of every rank at ``step``."""
        return self.sampler.global_indices(step)

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids [b, 8, L] int64, labels [b] int64) of this rank at ``step``."""
        return self.cache.batch(self.sampler.indices_for_step(step))

    def class_dropout_uniform(self, step: int) -> torch.Tensor:
        draws = np.random.default_rng([self.seed, step, 1]).random(self.global_batch)
        return torch.from_numpy(draws[self.rank * self.local_batch:(self.rank + 1) * self.local_batch])


# --------------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_WHAT = "generator training checkpoint"
# settings that change the data order or the batches: resuming with other values is not exact
ORDER_ARGS = ("seed", "batch_size", "train_cache")


def cache_description(cache: TokenCache) -> Dict[str, Any]:
    return {"path": str(cache.path), "tokenizer_fingerprint": cache.fingerprint,
            "tokenizer_source": cache.manifest.get("tokenizer_source"), "grid": list(cache.grid),
            "img_size": cache.img_size}


class TrainingState:
    """What a training checkpoint holds of the run (the state protocol of
    :class:`training.checkpointer.Checkpointer`): a generator file's entries (format, config, model: see
    :func:`generation.ar_model.generator_payload`, so ``load_generator`` and ``generation.sample`` read a
    checkpoint like ``generator.pth``), plus ema, ema_updates, optimizer, label_names, token_cache and
    train_config. The Checkpointer adds step, ranks (each process's RNG states) and args."""

    def __init__(self, config: TrainConfig, model: ARGenerator, optimizer, ema, train_cache: Optional[TokenCache] = None):
        self.config, self.model, self.optimizer, self.ema, self.train_cache = config, model, optimizer, ema, train_cache

    def state_dict(self) -> Dict[str, Any]:
        ema, cache = self.ema, self.train_cache
        return generator_payload(self.model, ema=None if ema is None else ema.module.state_dict(),
                                 ema_updates=None if ema is None else int(ema.n_averaged),
                                 optimizer=self.optimizer.state_dict(),
                                 label_names=None if cache is None else cache.label_names,
                                 token_cache=None if cache is None else cache_description(cache),
                                 train_config=dataclasses.asdict(self.config))

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        """Model, optimizer and EMA from ``ckpt``; ValueError for a checkpoint of another generator."""
        model = self.model
        saved = ARConfig.from_dict(ckpt["config"])
        if saved.preset != model.config.preset or saved.head != model.config.head:
            raise ValueError(f"checkpoint of a {saved.preset!r} generator with {saved.head} heads, but this run builds "
                             f"{model.config.preset!r} with {model.config.head} heads; use the same --preset/--head or "
                             f"another --out")
        if saved != model.config:
            raise ValueError(f"the checkpoint's generator config differs from this run's ({saved.to_dict()} vs "
                             f"{model.config.to_dict()}); the token cache or model settings changed")
        if self.ema is not None and ckpt.get("ema") is None:
            raise ValueError(f"holds no EMA weights but this run has --ema {self.config.ema}")
        model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(int(ckpt.get("ema_updates") or 0))

    def nonfinite_tensors(self) -> List[str]:
        named = list(self.model.state_dict().items())
        if self.ema is not None:
            named += [(f"ema.{k}", v) for k, v in self.ema.module.state_dict().items()]
        return nonfinite_names(named)


def make_checkpointer(config: TrainConfig) -> Checkpointer:
    """The run folder's checkpointer (it locks ``--out``: build it before anything else)."""
    return Checkpointer(Path(config.out), config.resume, config.keep_checkpoints, GENERATOR_FORMAT, CHECKPOINT_WHAT,
                        args=dataclasses.asdict(config), order_args=ORDER_ARGS, name="synthesis")


# --------------------------------------------------------------------------------------------------
# Logging

class RunLogger(StepLog):
    """The shared step log (metrics.jsonl, a console line per record, progress bar) and loss curves at the end."""

    def plot(self, out_path: Path) -> Optional[Path]:
        if not self.enabled or not self.path.is_file():
            return None
        records = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if not train:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train loss", lw=1.2)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2)
        baselines = self.path.parent / "baselines.json"
        if baselines.is_file():
            unigram = json.loads(baselines.read_text()).get("unigram_train_fit_on_val")
            if unigram:
                ax.axhline(unigram, color="gray", ls="--", label="unigram (train fit) on val")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats per code)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_path, dpi=110)
        plt.close(fig)
        return out_path


class SampleGrids:
    """Per-label sample grids decoded with the cache's tokenizer (skipped, with one warning, when that
    tokenizer cannot be loaded, e.g. the cache was moved to another machine)."""

    def __init__(self, cache: TokenCache, device: torch.device, per_label: int):
        self.label_names, self.per_label, self.tokenizer = cache.label_names, per_label, None
        source = cache.manifest.get("tokenizer_source")
        try:
            import meditok

            self.tokenizer = meditok.load_meditok(source, device=device).eval()
        except Exception as error:  # any failure only costs the pictures, never the run
            print(f"warning: no sample grids: cannot load the cache's tokenizer {source!r} ({error})", file=sys.stderr)

    def write(self, model: ARGenerator, folder: Path, seed: int, amp_dtype) -> None:
        if self.tokenizer is None or self.per_label < 1:
            return
        from .sample import run_sampling

        labels = torch.arange(len(self.label_names)).repeat_interleave(self.per_label)
        was_training = model.training
        model.eval()
        run_sampling(model, self.tokenizer, labels, self.label_names, folder, batch_size=max(len(labels), 1), seed=seed,
                     amp_dtype=amp_dtype, progress=False, write_npz=False)
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Measurements

@torch.no_grad()
def validation_loss(model: ARGenerator, cache: TokenCache, batch_size: int, amp_dtype) -> float:
    """Mean cross-entropy (nats per code) over every row of ``cache``, labels kept (no class dropout)."""
    model_was_training = model.training
    model.eval()
    device = model.rope_cos.device
    total, count = 0.0, 0
    for start in range(0, len(cache), batch_size):
        ids, labels = cache.batch(range(start, min(len(cache), start + batch_size)))
        ids, labels = ids.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(ids, labels)
        total += F.cross_entropy(logits.float().flatten(0, 2), ids.permute(0, 2, 1).flatten(), reduction="sum").item()
        count += ids.numel()
    model.train(model_was_training)
    return total / count


def unigram_baselines(train: TokenCache, val: TokenCache) -> Dict[str, float]:
    """Cross-entropy (nats per code) of position-independent code distributions, one per codebook, on the
    validation ids: fitted on the training ids with add-one smoothing (a model that ignores context), and
    the validation ids' own distribution (its entropy: the best any unigram model can do on them)."""
    V = int(max(train.ids.max(), val.ids.max())) + 1
    V = max(V, 4096 if V <= 4096 else V)
    result = {}
    train_ids, val_ids = np.asarray(train.ids), np.asarray(val.ids)
    fitted, own = [], []
    for k in range(train_ids.shape[1]):
        counts = np.bincount(train_ids[:, k].ravel(), minlength=V).astype(np.float64) + 1.0
        log_p = np.log(counts / counts.sum())
        val_codes = val_ids[:, k].ravel()
        fitted.append(-log_p[val_codes].mean())
        val_counts = np.bincount(val_codes, minlength=V).astype(np.float64)
        p = val_counts[val_counts > 0] / val_counts.sum()
        own.append(-(p * np.log(p)).sum())
    result["unigram_train_fit_on_val"] = float(np.mean(fitted))
    result["unigram_val_entropy"] = float(np.mean(own))
    result["uniform"] = float(math.log(V))
    return result


# --------------------------------------------------------------------------------------------------
# The loop

def build_model(config: TrainConfig, cache: TokenCache) -> ARGenerator:
    ar = get_ar_config(config.preset, head=config.head, grid=cache.grid, num_labels=len(cache.label_names),
                       num_codebooks=cache.num_codebooks, codebook_size=cache.codebook_size, **config.model)
    return ARGenerator(ar)


@dataclass
class Run:
    """Everything the loop works on, built by :func:`prepare_run`."""
    config: TrainConfig
    device: torch.device
    main_process: bool
    out: Path
    train_cache: TokenCache
    val_cache: Optional[TokenCache]
    data: TokenBatches
    total_steps: int
    amp_dtype: Optional[torch.dtype]
    model: ARGenerator
    trained: torch.nn.Module            # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    ema: Any                            # AveragedModel or None
    state: TrainingState
    checkpointer: Checkpointer
    logger: RunLogger
    step: int = 0

    @property
    def evaluated(self) -> ARGenerator:
        """The weights validation and samples use: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def payload(self) -> Dict[str, Any]:
        """generator.pth: a checkpoint's entries, without the per-rank states."""
        return {**self.state.state_dict(), "step": self.step}


def prepare_run(config: TrainConfig, device: torch.device, checkpointer: Checkpointer) -> Run:
    """Caches, batches, model, optimiser and EMA (restored from ``--resume`` by ``checkpointer``), the run files."""
    rank, world = distributed.rank(), distributed.world_size()
    out, main_process = Path(config.out), rank == 0
    torch.manual_seed(config.seed)
    train_cache = TokenCache(config.train_cache)
    val_cache = TokenCache(config.val_cache, label_names=train_cache.label_names) if config.val_cache else None
    if val_cache is not None:
        check_same_tokenizer(train_cache, val_cache)
    data = TokenBatches(train_cache, config.batch_size, config.seed, rank, world)
    total_steps = config.max_steps or max(1, int(round(config.epochs * data.steps_per_epoch)))
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda" and config.bf16)
    model = build_model(config, train_cache).to(device)
    optimizer = make_optimizer(config, model)
    ema = None
    if config.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
    state = TrainingState(config, model, optimizer, ema, train_cache)
    step = checkpointer.restore(state)
    logger = RunLogger(out, total_steps, step, enabled=main_process, desc="synthesis")  # drops records after `step`
    run = Run(config, device, main_process, out, train_cache, val_cache, data, total_steps,
              torch.bfloat16 if bf16 else None, model, model, optimizer, ema, state, checkpointer, logger, step)
    checkpointer.write_args()
    if main_process:
        (out / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "model_config": model.config.to_dict(),
                                                      "world_size": world}, indent=2) + "\n")
        if val_cache is not None:
            (out / "baselines.json").write_text(json.dumps(unigram_baselines(train_cache, val_cache), indent=2) + "\n")
    if world > 1:  # wrapped after the restore, as DDP broadcasts rank 0's weights when it is built
        run.trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


class ThroughputLog:
    """The metrics.jsonl record of a logged step: loss, lr, images/s, tokens/s, counted TFLOP/s and MFU over the
    steps since the last one."""

    def __init__(self, run: Run):
        ids0, labels0 = run.data.batch(0)
        self.flops_per_image = count_training_flops(run.model, ids0[:1].to(run.device), labels0[:1].to(run.device))
        self.peak = peak_flops(run.device, run.config.peak_tflops, bf16=run.amp_dtype is not None)
        self.images, self.since = 0, time.perf_counter()

    def record(self, run: Run, loss: float) -> Dict[str, Any]:
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        images_per_s = self.images / max(now - self.since, 1e-9)
        record = {"step": run.step, "epoch": round(run.step / run.data.steps_per_epoch, 3), "loss": loss,
                  "lr": learning_rate(run.config, run.step - 1), "images_per_s": round(images_per_s, 2),
                  "tokens_per_s": round(images_per_s * run.model.K * run.model.L, 1),
                  "tflops_per_s": round(images_per_s * self.flops_per_image / 1e12, 4)}
        if self.peak:
            record["mfu"] = round(images_per_s * self.flops_per_image / self.peak, 4)
        self.images, self.since = 0, now
        return record


def after_step(run: Run, loss: float, throughput: ThroughputLog, grids: Optional["SampleGrids"], stopped: str) -> None:
    """After a step. Rank 0: the metrics record (a finite loss vouches for the checkpoint before it), the
    validation loss, sample grids; every rank: the checkpoint (each contributes its RNG states)."""
    config, step, last = run.config, run.step, run.step == run.total_steps
    if run.main_process:
        if step % config.log_every == 0 or last:
            run.logger.write(throughput.record(run, loss))
            if math.isfinite(loss):
                run.checkpointer.mark_healthy(step)
        if run.val_cache is not None and ((config.eval_every and step % config.eval_every == 0) or last):
            run.logger.write({"step": step, "val_loss": validation_loss(run.evaluated, run.val_cache,
                                                                        config.batch_size, run.amp_dtype)})
        if config.sample_every and step % config.sample_every == 0 and not last:
            grids.write(run.evaluated, run.out / "samples" / f"step-{step:07d}", config.seed, run.amp_dtype)
    if (config.save_every and step % config.save_every == 0) or last or stopped:
        run.checkpointer.save(step, run.state)


def finish(run: Run, grids: "SampleGrids", flops_per_image: int, began: float) -> Dict[str, Any]:
    """Rank 0: generator.pth, the final samples, validation loss, summary.json and the loss curves."""
    out = run.out
    atomic_torch_save(run.payload(), out / "generator.pth")
    grids.write(run.evaluated, out / "samples" / "final", run.config.seed, run.amp_dtype)
    summary = {"steps": run.step, "seconds": round(time.perf_counter() - began, 1),
               "parameters": run.model.num_parameters(), "train_flops_per_image": flops_per_image,
               "generator": str(out / "generator.pth")}
    if run.val_cache is not None:
        summary["val_loss"] = validation_loss(run.evaluated, run.val_cache, run.config.batch_size, run.amp_dtype)
        summary.update(json.loads((out / "baselines.json").read_text()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.logger.plot(out / "loss_curves.png")
    print(json.dumps(summary), flush=True)
    return summary


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training; returns the summary also written to ``out/summary.json`` (rank 0), or, for a run
    stopped by a signal, the step it saved and its exit status. Raises RunError (the run folder or the checkpoint
    refused, a failed save), FloatingPointError (non-finite weights, never saved), ValueError (unusable caches)."""
    device = distributed.init_distributed(config.device)
    checkpointer, stops, stopped, run = None, None, "", None
    try:
        checkpointer = make_checkpointer(config)  # locks the run folder first
        run = prepare_run(config, device, checkpointer)
        throughput = ThroughputLog(run)
        grids = SampleGrids(run.train_cache, run.device, config.sample_per_label) if run.main_process else None
        run.model.train()
        began, stops = time.perf_counter(), StopRequests(config.log_every, 0, "synthesis")
        while run.step < run.total_steps and not stopped:
            loss = train_step(run.trained, run.model, run.optimizer, run.data, run.step, config, run.device,
                              run.amp_dtype)
            if run.ema is not None:
                run.ema.update_parameters(run.model)
            run.step += 1
            run.logger.advance()
            throughput.images += config.batch_size
            stopped = stops.should_stop(run.step, run.total_steps, run.device)
            after_step(run, loss, throughput, grids, stopped)
            distributed.barrier()
        run.logger.close()  # the progress bar ends before the closing messages
        if stopped:
            if run.main_process:
                print(f"[synthesis] stopped ({stopped}) at step {run.step}/{run.total_steps}: checkpoint saved; "
                      f"`--resume auto --out {run.out}` continues from here", flush=True)
            return {"steps": run.step, "stopped": stopped, "exit_code": stops.final_exit_code(stopped)}
        return finish(run, grids, throughput.flops_per_image, began) if run.main_process else {}
    finally:
        for part in (run and run.logger, stops, checkpointer):
            if part is not None:
                part.close()
        distributed.cleanup()


def train_step(trained, model: ARGenerator, optimizer, data: TokenBatches, step: int, config: TrainConfig,
               device: torch.device, amp_dtype) -> float:
    """One optimizer step on this rank's slice of global batch ``step``; returns the global mean loss."""
    ids, labels = data.batch(step)
    ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    labels = model.condition.drop_labels(labels, uniform=data.class_dropout_uniform(step))
    set_lr(optimizer, learning_rate(config, step))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
        logits = trained(ids, labels)
    loss = F.cross_entropy(logits.float().flatten(0, 2), ids.permute(0, 2, 1).flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    value = loss.detach()
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(value)
        value /= distributed.world_size()
    return float(value)


# --------------------------------------------------------------------------------------------------
# CLI

def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Settings from the defaults, then ``--config``, then the flags (one per :class:`TrainConfig` field, its
    comment the help text: :mod:`training.config`)."""
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with any of the settings below: a path or a configs/ name "
                                         "(e.g. synthesis_tiny_cpu)")
    config.add_dataclass_flags(parser, TrainConfig)
    ns = parser.parse_args(argv)
    return TrainConfig.from_sources(ns.config, config.given(ns))


def main(argv: Optional[List[str]] = None) -> int:
    """0 when the run finished, 143 / 130 when SIGTERM / Ctrl-C stopped it (after saving), 2 for bad input, 1 when
    the run folder or its checkpoint refused the run, a save failed or the weights turned non-finite."""
    try:
        config = parse_args(argv)
        if not config.train_cache:
            raise UsageError("no --train-cache given (make one with python -m generation.tokenize_dataset)")
        return train(config).get("exit_code", 0)
    except FAILURES as error:  # TokenCacheError is a ValueError: exit 2
        return failure_status(PROG, error)


if __name__ == "__main__":
    sys.exit(main())
