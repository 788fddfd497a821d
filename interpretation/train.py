"""Train the projector (stage A) and LoRA adapters (stage B) of MedITok + a causal language model (paper Table 4).

    python -m interpretation.train --config configs/vqa_tiny_cpu.json --stage A      # projector on captions
    python -m interpretation.train --config configs/vqa_tiny_cpu.json --stage B      # projector + LoRA on Q&A
    torchrun --nproc_per_node 8 -m interpretation.train --config configs/vqa_llava_med_7b.json --stage B

Stage A (projector pre-training, LLaVA's "feature alignment"): the vision tower and the language model are frozen;
only the projector learns, on image–caption pairs (PubMedVision / LLaVA-Med alignment JSON, or a caption CSV), with
the ``caption`` template. Stage B (instruction tuning): the projector (from stage A, ``--init-projector``) and LoRA
adapters on the language model (``peft``) learn on question–answer pairs with the model's conversation template.
The paper: stage A on 500k PubMedVision captions, 1 epoch, batch 32; stage B 100k VQA pairs, 2 epochs.

A config file (JSON) sets any flag (``"batch_size": 4``); keys ``"stage_A"`` / ``"stage_B"`` hold per-stage
values; the command line overrides both. The run folder gets ``args.json``, ``metrics.jsonl`` (loss, lr,
samples/s, tokens/s every --log-every steps), ``ckpt-{step:08d}.pth`` (the shared ``training.checkpointer``:
atomic, with a .sha256, the last --keep-checkpoints; trainable weights, optimiser, step, every rank's RNG:
``--resume auto`` continues exactly; it also takes the ``ckpt-last.pth`` of earlier versions, whose data order
was another one, so such a resume continues the run but not bit-for-bit),
``projector.safetensors``, ``lora/`` (stage B, a peft adapter folder) and ``interpretation.json`` (what
``evaluation.vqa`` needs to rebuild the model). The data order is ``training.sampler.StepSampler``'s and the
learning rate ``training.schedules.cosine_lr`` (linear warm-up, cosine to 0): both functions of the step.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from meditok import weights_fingerprint
from training import distributed
from training.checkpointer import Checkpointer, nonfinite_names
from training.config import config_file_as_defaults
from training.options import FAILURES, PRECISIONS, ArgumentParser, UsageError, check_numbers, failure_status
from training.sampler import StepSampler
from training.schedules import cosine_lr
from training.step_log import StepLog
from training.stopping import StopRequests
from training.workers import ignore_stop_signals, shutdown_workers

from .data import FORMATS, VQARecord, check_images_exist, read_many
from .loading import (CHECKPOINT_FORMAT, CHECKPOINT_WHAT, FINGERPRINT_KEY, LEGACY_CHECKPOINTS, LORA_DIR, RUN_FILE,
                      WEIGHTS_KEY, upgrade)
from .model import PROJECTOR_FILE, PROJECTOR_TYPES, TEMPLATES, MedITokLlava
from .vision_tower import FEATURE_KINDS, MedITokVisionTower

PROG = "python -m interpretation.train"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout (its examples) and shows every default."""


# ----------------------------------------------------------------------------------------------------
# Arguments
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG, description=__doc__, epilog="Details: docs/vqa.md.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="JSON file of flag values (keys as below, with _ or -)")
    p.add_argument("--stage", choices=("A", "B"), required=False, default=None,
                   help="A: projector only on image-caption pairs; B: projector + LoRA on question-answer pairs")
    g = p.add_argument_group("model")
    g.add_argument("--language-model", default=None,
                   help="folder of a transformers causal LM + tokenizer (e.g. LLaVA-Med v1.5's Mistral-7B; "
                        "scripts/make_tiny_lm.py writes a tiny random one)")
    g.add_argument("--vision-tower", default="random:tiny",
                   help="MedITok weights: anything meditok.load_meditok reads, or random:<preset> (smoke tests)")
    g.add_argument("--features", choices=FEATURE_KINDS, default="quantized",
                   help="what the LM sees: the quantised path after the output projection (the released "
                        "integration), or pre-quantisation features (ablation)")
    g.add_argument("--img-size", type=int, default=None, help="image side (default: the tokenizer's native size)")
    g.add_argument("--projector", choices=PROJECTOR_TYPES, default="mlp2x_gelu", help="projector architecture")
    g.add_argument("--template", choices=TEMPLATES, default="auto",
                   help="stage-B conversation template: the tokenizer's chat template, or plain USER:/ASSISTANT:")
    g.add_argument("--init-projector", default=None, help="stage B: the stage-A run folder (or projector file)")
    g.add_argument("--lora-r", type=int, default=128, help="LoRA rank (LLaVA's LoRA recipe: 128)")
    g.add_argument("--lora-alpha", type=int, default=256, help="LoRA alpha")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names LoRA wraps")
    g.add_argument("--lm-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the language model's weights (bfloat16 for 7B on GPU)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=None, help="caption (stage A) or question (stage B) file(s)")
    d.add_argument("--data-format", choices=FORMATS, default="auto", help="file format (docs/vqa.md)")
    d.add_argument("--image-root", default=None, help="folder relative image paths are resolved against")
    d.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (answers are cut first)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    t = p.add_argument_group("training")
    t.add_argument("--out", default=None, help="run folder")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    t.add_argument("--batch-size", type=int, default=4, help="samples per step per process")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimiser step")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (LoRA in stage B; the projector in A)")
    t.add_argument("--projector-lr", type=float, default=None, help="stage B: projector learning rate (default --lr)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up, fraction of the steps")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (0: off)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on a CPU; or fp32 / bf16")
    t.add_argument("--bf16", choices=("auto", "true", "false"), default=None,
                   help="older spelling of --precision (true = bf16, false = fp32)")
    t.add_argument("--grad-ckpt", choices=("true", "false"), default="false",
                   help="gradient checkpointing in the language model")
    t.add_argument("--seed", type=int, default=0, help="seed (data order, initial projector, LoRA)")
    t.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    t.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    t.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in the run folder")
    t.add_argument("--resume", default=None, help="'auto' (the newest usable checkpoint, or an older version's "
                   "ckpt-last.pth), 'restart' (step 0) or a checkpoint path; without it a run's folder is refused")
    t.add_argument("--stop-after-steps", type=int, default=None,
                   help="save and stop after this many optimiser steps (to split a run; --resume auto continues)")
    t.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line over config file over defaults; the config's ``stage_A`` / ``stage_B`` apply to that stage."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)

    def this_stage(values: Dict[str, Any]) -> Dict[str, Any]:  # the shared keys, then the stage's section
        stage = first.stage or values.get("stage")
        return {**{k: v for k, v in values.items() if not k.startswith("stage_")},
                **(values.get(f"stage_{stage}", {}) if stage else {})}

    config_file_as_defaults(parser, first.config, "vqa_", select=this_stage)
    args = parser.parse_args(argv)
    for name in ("stage", "language_model", "data", "out"):
        if getattr(args, name) in (None, []):
            raise UsageError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    problems = check_numbers(vars(args), positive=("epochs", "batch_size", "grad_accum", "lr", "log_every",
                                                   "save_every", "max_length", "lora_r", "lora_alpha",
                                                   "keep_checkpoints"),
                             non_negative=("weight_decay", "max_grad_norm", "num_workers", "projector_lr",
                                           "stop_after_steps", "img_size"),
                             unit_interval=("warmup_ratio", "lora_dropout"))
    if problems:
        raise UsageError("; ".join(problems))
    return args


# ----------------------------------------------------------------------------------------------------
# Distributed
def setup_distributed(device_arg: Optional[str]) -> tuple:
    """(rank, world size, device); joins the torchrun process group (``training.distributed``)."""
    device = distributed.init_distributed(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    return distributed.rank(), distributed.world_size(), device


# ----------------------------------------------------------------------------------------------------
# Model
def build_model(args: argparse.Namespace, device: torch.device) -> MedITokLlava:
    """Tower + LM + projector, frozen and LoRA-wrapped for the stage; the stage-A projector loaded in stage B."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_dir = Path(args.language_model)
    if not lm_dir.is_dir():
        raise UsageError(f"--language-model {lm_dir}: no such folder; point it at a saved transformers model "
                         f"(python scripts/make_tiny_lm.py writes a tiny one)")
    tower_dtype = torch.bfloat16 if use_bf16(args, device) else None  # the tower first: a bad path fails in seconds
    tower = MedITokVisionTower.from_source(args.vision_tower, args.features, img_size=args.img_size, device=device,
                                           dtype=tower_dtype, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    dtype = torch.bfloat16 if args.lm_dtype == "bfloat16" else torch.float32
    language_model = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=dtype).to(device)
    language_model.requires_grad_(False)
    torch.manual_seed(args.seed)
    model = MedITokLlava(tower, language_model, tokenizer, args.projector, args.template).to(device)
    if args.init_projector:
        model.load_projector(args.init_projector)
    elif args.stage == "B":
        print("warning: stage B without --init-projector: the projector starts from random weights")
    if args.stage == "B":
        model.language_model = add_lora(language_model, args)
    if args.grad_ckpt == "true":
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(language_model, args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in language_model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UsageError(f"--lora-targets {missing} are not modules of {args.language_model}; modules with "
                         f"'proj' in their name there: {sorted(n for n in present if 'proj' in n)}")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(language_model, config)


def trainable_parameters(model: MedITokLlava) -> Dict[str, torch.nn.Parameter]:
    """Name → parameter for what the stage trains (projector, and LoRA weights in stage B)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def use_bf16(args: argparse.Namespace, device: torch.device) -> bool:
    precision = {"true": "bf16", "false": "fp32"}.get(getattr(args, "bf16", None) or "", args.precision)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


# ----------------------------------------------------------------------------------------------------
# Data
class ConversationDataset(Dataset):
    """Records → {'image' [3, S, S] in [-1, 1], 'input_ids', 'labels'} (token lists; see MedITokLlava.encode_prompt)."""

    def __init__(self, records: List[VQARecord], model: MedITokLlava, captions: bool, max_length: int):
        self.records = records
        self.tower = model.vision_tower
        self.captions = captions
        self.max_length = max_length
        # Check every prompt up front: a bad record fails before any training, naming its file and record.
        self.tokens = [model.encode_prompt(r.prompt_turns(), caption=captions, source=r.source, max_length=max_length)
                       for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.records[index]
        return {"image": self.tower.load_image(record.image, record.modality), **self.tokens[index]}


class MicroBatches:
    """The DataLoader's batch_sampler: a :class:`training.sampler.StepSampler` over optimiser steps (``batch_size
    × grad_accum`` rows per process per step, a pure function of (seed, step)) cut into the step's ``grad_accum``
    micro-batches of ``batch_size`` rows."""

    def __init__(self, steps: StepSampler, grad_accum: int):
        self.steps, self.grad_accum = steps, grad_accum

    def __iter__(self) -> Iterator[List[int]]:
        for rows in self.steps:
            size = len(rows) // self.grad_accum
            for k in range(self.grad_accum):
                yield rows[k * size:(k + 1) * size]

    def __len__(self) -> int:
        return len(self.steps) * self.grad_accum


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world: int) -> int:
    """Optimiser steps in one pass over ``n`` samples (the tail that fills no global batch is dropped)."""
    return n // (batch_size * grad_accum * world)


def collate(samples: List[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    from .model import pad_batch

    batch = pad_batch(samples, pad_id, side="right")
    batch["images"] = torch.stack([s["image"] for s in samples])
    return batch


# ----------------------------------------------------------------------------------------------------
# Checkpoints (files, resume, per-rank RNG states: training.checkpointer.Checkpointer; layout: .loading)
ORDER_ARGS = ("seed", "batch_size", "grad_accum", "data", "data_format", "max_length")  # they change the batches


class TrainingState:
    """The run's part of a checkpoint (the Checkpointer adds the step, every rank's RNG states and the
    arguments): the stage, the trainable weights (the projector; + LoRA in stage B) and the optimiser. The
    learning rate is a function of the step: nothing of the schedule is saved (an old ``scheduler`` entry is
    ignored)."""

    def __init__(self, model: MedITokLlava, optimizer: torch.optim.Optimizer, stage: str):
        self.model, self.optimizer, self.stage = model, optimizer, stage

    def state_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage,
                WEIGHTS_KEY: {k: v.detach().cpu() for k, v in trainable_parameters(self.model).items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        """ValueError (the Checkpointer's one-line refusal) for a checkpoint of another stage or LoRA setting."""
        params, saved = trainable_parameters(self.model), ckpt.get(WEIGHTS_KEY) or {}
        if ckpt.get("stage") not in (None, self.stage):
            raise ValueError(f"it is a stage {ckpt['stage']} checkpoint and this is stage {self.stage}; resume "
                             f"with the same --stage (stage B starts from stage A with --init-projector)")
        reshaped = [n for n in params if n in saved and tuple(saved[n].shape) != tuple(params[n].shape)]
        if set(params) != set(saved) or reshaped:
            raise ValueError("its trainable parameters differ from this run's (stage or LoRA settings changed?); "
                             "resume with the same --config and --stage")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def nonfinite_tensors(self) -> List[str]:
        return nonfinite_names(trainable_parameters(self.model).items())


def make_checkpointer(args: argparse.Namespace) -> Checkpointer:
    """The run folder's checkpointer (locks the folder: create it before anything is written there)."""
    return Checkpointer(Path(args.out), args.resume or "", args.keep_checkpoints, CHECKPOINT_FORMAT,
                        CHECKPOINT_WHAT, args=vars(args), order_args=ORDER_ARGS, weights_key=WEIGHTS_KEY,
                        legacy=LEGACY_CHECKPOINTS, upgrade=upgrade, name=f"stage {args.stage}")


def save_outputs(out: Path, model: MedITokLlava, args) -> None:
    """The final artefacts: projector, LoRA adapter (stage B), and the description evaluation.vqa reads."""
    from meditok import atomic_write

    model.save_projector(out / PROJECTOR_FILE)
    lora = None
    if args.stage == "B":
        model.language_model.save_pretrained(str(out / LORA_DIR))
        lora = LORA_DIR
    description = {"stage": args.stage, "language_model": str(Path(args.language_model).resolve()),
                   "vision_tower": (str(Path(args.vision_tower).resolve()) if Path(args.vision_tower).exists()
                                    else args.vision_tower), "features": args.features,
                   "img_size": model.vision_tower.img_size, "projector": PROJECTOR_FILE, "lora": lora,
                   **model.projector_config(), "template": model.template.name, "seed": args.seed,
                   # evaluation.vqa refuses another tower's weights by this (a path can be overwritten)
                   FINGERPRINT_KEY: weights_fingerprint(model.vision_tower.tokenizer)}
    atomic_write(out / RUN_FILE, lambda f: f.write((json.dumps(description, indent=2) + "\n").encode()))


# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# The loop
def make_optimizer(model: MedITokLlava, args):
    projector = [p for p in model.projector.parameters() if p.requires_grad]
    others = [p for n, p in trainable_parameters(model).items() if not n.startswith("projector.")]
    groups = [{"params": projector, "lr": args.projector_lr or args.lr}]
    if others:
        groups.append({"params": others, "lr": args.lr})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.999))


def learning_rates(peaks: Sequence[float], step: int, total_steps: int, warmup_steps: int) -> List[float]:
    """Each parameter group's learning rate at ``step`` (0-based): its own peak on the one schedule of every
    trainer, :func:`training.schedules.cosine_lr` with floor 0 — peak·(step+1)/warmup during the warm-up, then
    peak·½(1 + cos(π·(step − warmup)/(total − warmup)))."""
    return [cosine_lr(step, total_steps, peak, 0.0, warmup_steps) for peak in peaks]


@dataclass
class Run:
    """Everything one stage's loop works on (built by :func:`prepare_run`)."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    model: MedITokLlava
    trained: torch.nn.Module          # the model, or its DDP wrapper
    dataset: ConversationDataset
    optimizer: torch.optim.Optimizer
    state: TrainingState
    checkpointer: Checkpointer
    peaks: List[float]                # each parameter group's peak learning rate
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    step: int = 0
    sampler: Optional[StepSampler] = None

    def set_learning_rates(self) -> float:
        """The schedule's learning rates for the coming step; returns the last group's (LoRA in stage B)."""
        lrs = learning_rates(self.peaks, self.step, self.total_steps, self.warmup_steps)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs[-1]


def prepare_run(args: argparse.Namespace) -> Run:
    """Distributed setup, the run folder (locked), model, data, optimiser, and the resumed state."""
    rank, world, device = setup_distributed(args.device)
    checkpointer = make_checkpointer(args)  # first: a folder in use or holding another run stops everything here
    try:
        run = build_run(args, rank, world, device, checkpointer)
        run.step = checkpointer.restore(run.state)  # weights, optimiser and this rank's RNG states
    except BaseException:
        checkpointer.close()
        raise
    checkpointer.write_args()
    if world > 1:
        run.trained = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def build_run(args: argparse.Namespace, rank: int, world: int, device: torch.device,
              checkpointer: Checkpointer) -> Run:
    """Model, data (every prompt checked), optimiser and schedule of a fresh run."""
    captions = args.stage == "A"
    # the data first: a bad file fails in seconds, before a large model is loaded (DataFormatError, PromptError:
    # ValueErrors naming the file and record, which main reports in one line with exit status 2, bad input)
    records = read_many(args.data, args.data_format, args.image_root, captions=captions)
    check_images_exist(records, args.image_root)
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    dataset = ConversationDataset(records, model, captions, args.max_length)
    params = trainable_parameters(model)
    if rank == 0:
        print(f"stage {args.stage}: {len(dataset)} samples, {sum(p.numel() for p in params.values()):,} trainable "
              f"parameters ({', '.join(sorted({n.split('.')[0] for n in params}))}), world size {world}")
    per_epoch = steps_per_epoch(len(dataset), args.batch_size, args.grad_accum, world)
    if per_epoch == 0:
        raise UsageError(f"{len(dataset)} samples are fewer than one step (--batch-size {args.batch_size} × "
                         f"--grad-accum {args.grad_accum} × {world} processes); lower --batch-size")
    total_steps = max(1, math.ceil(args.epochs * per_epoch))
    optimizer = make_optimizer(model, args)
    peaks = [group["lr"] for group in optimizer.param_groups]
    return Run(args, rank, world, device, Path(args.out), model, model, dataset, optimizer,
               TrainingState(model, optimizer, args.stage), checkpointer, peaks, per_epoch, total_steps,
               int(args.warmup_ratio * total_steps))


def make_loader(run: Run) -> DataLoader:
    """Micro-batches from the run's step to its end (``run.sampler`` says which epoch a step is in)."""
    args = run.args
    run.sampler = StepSampler(len(run.dataset), args.batch_size * args.grad_accum, args.seed, run.rank, run.world,
                              start_step=run.step, steps=run.total_steps)
    # Its own generator: creating a loader draws a seed, which must not move the RNG that LoRA dropout uses
    # (else a resumed run would diverge from an unbroken one).
    return DataLoader(run.dataset, batch_sampler=MicroBatches(run.sampler, args.grad_accum),
                      num_workers=args.num_workers, worker_init_fn=ignore_stop_signals,
                      collate_fn=functools.partial(collate, pad_id=run.model.tokenizer.pad_token_id),
                      generator=torch.Generator().manual_seed(args.seed))


def global_totals(run: Run, loss: float, tokens: int, samples: int) -> tuple:
    """(loss, tokens, samples) over all ranks: the answer-token-weighted loss, not rank 0's share."""
    if run.world == 1:
        return loss, tokens, samples
    totals = torch.tensor([loss * tokens, tokens, samples], dtype=torch.float64, device=run.device)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1)), int(totals[1]), int(totals[2])


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one stage; returns a summary (steps, final loss, seconds, finished, exit code)."""
    run = prepare_run(args)
    stops, batches = StopRequests(1, args.stop_after_steps or 0, f"stage {args.stage}"), None
    start_time = time.time()
    try:
        batches = iter(make_loader(run))
        stopped, last_loss = run_loop(run, batches, stops, start_time)
        finished = run.step >= run.total_steps
        if run.rank == 0 and finished:
            save_outputs(run.out, run.model, args)
        if run.rank == 0 and stopped:
            print(f"[stage {args.stage}] stopped ({stopped}) at step {run.step}/{run.total_steps}: checkpoint "
                  f"saved; `--resume auto` with the same --out continues from here", flush=True)
        if run.world > 1:
            dist.barrier()
    finally:
        shutdown_workers(batches)  # workers would outlive a failed run (and block the interpreter's exit)
        stops.close()
        run.checkpointer.close()
    return {"steps": run.step, "total_steps": run.total_steps, "final_loss": last_loss,
            "seconds": time.time() - start_time, "finished": finished, "exit_code": stops.final_exit_code(stopped)}


def run_loop(run: Run, batches: Iterator[Dict[str, torch.Tensor]], stops: StopRequests, start_time: float) -> tuple:
    """Optimiser steps until the end or a stop request (the ranks agree every step), logging every --log-every
    steps and saving every --save-every steps, at the stop and at the end; returns (the stop's reason or '',
    the last step's loss)."""
    args, bf16 = run.args, use_bf16(run.args, run.device)
    # metrics.jsonl (the steps after the checkpoint are logged again), a console line per record, progress bar
    log = StepLog(run.out, run.total_steps, run.step, enabled=run.rank == 0, desc=f"stage {args.stage}")
    window_start, window_samples, window_tokens = time.time(), 0, 0
    stopped, last_loss = "", float("nan")
    run.model.train()
    try:
        while run.step < run.total_steps and not stopped:
            micro = [next(batches) for _ in range(args.grad_accum)]
            lr = run.set_learning_rates()
            loss, samples, tokens = train_step(run.trained, run.model, micro, run.optimizer, run.device, bf16, args)
            run.step += 1
            last_loss, tokens, samples = global_totals(run, loss, tokens, samples)
            window_samples, window_tokens = window_samples + samples, window_tokens + tokens
            log.advance()
            if run.step % args.log_every == 0 or run.step == run.total_steps:
                elapsed = max(time.time() - window_start, 1e-9)
                log.write({"step": run.step, "epoch": run.sampler.epoch_of(run.step - 1), "loss": last_loss,
                           "lr": lr, "samples_per_s": window_samples / elapsed,
                           "tokens_per_s": window_tokens / elapsed, "elapsed_s": time.time() - start_time})
                window_start, window_samples, window_tokens = time.time(), 0, 0
                if math.isfinite(last_loss):
                    run.checkpointer.mark_healthy(run.step)  # a finite step vouches for the newest checkpoint
            stopped = stops.should_stop(run.step, run.total_steps, run.device)
            if run.step % args.save_every == 0 or run.step >= run.total_steps or stopped:
                run.checkpointer.save(run.step, run.state)  # on every rank: each adds its RNG states
    finally:
        log.close()
    return stopped, last_loss


def train_step(trained, model: MedITokLlava, micro: List[Dict[str, torch.Tensor]], optimizer,
               device: torch.device, bf16: bool, args) -> tuple:
    """One optimiser step over ``grad_accum`` micro-batches at the learning rates set in the optimiser; returns
    (mean loss, samples, answer tokens). Each micro-batch's loss is weighted by its share of the answer tokens,
    so accumulation equals one big batch. Under DDP only the last micro-batch synchronises gradients."""
    optimizer.zero_grad(set_to_none=True)
    total_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    loss_sum, samples = 0.0, 0
    for k, batch in enumerate(micro):
        batch = {key: v.to(device) for key, v in batch.items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        sync = k == len(micro) - 1 or not hasattr(trained, "no_sync")
        with contextlib.nullcontext() if sync else trained.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = trained(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
            (loss * tokens / max(total_tokens, 1)).backward()
        loss_sum += float(loss.detach()) * tokens
        samples += batch["input_ids"].shape[0]
    params = list(trainable_parameters(model).values())
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    return loss_sum / max(total_tokens, 1), samples, total_tokens


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the stage finished (or stopped at --stop-after-steps), 143 / 130 when SIGTERM / Ctrl-C stopped it
    (after saving), 2 for a bad option value or a missing model, 1 when the run cannot go on (a run folder in use
    or holding another run, no usable checkpoint, a bad data file, non-finite weights, a full disk)."""
    try:
        args = parse_args(argv)
        summary = train(args)
    except FAILURES as error:  # a missing model or tower, a projector of another model, ...: exit 2
        return failure_status(PROG, error)
    finally:
        distributed.cleanup()
    print(json.dumps(summary))
    return summary.pop("exit_code")


if __name__ == "__main__":
    sys.exit(main())
