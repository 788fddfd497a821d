"""Train the MedITok tokenizer, stage 1 (visual alignment) or stage 2 (textual alignment), docs/method.md §2;
``--stage 3`` trains both alignments in one stage (the paper's one-stage ablation, docs/miniature.md).

    python train.py --config stage1_tiny_cpu                     # CPU try-out on datasets/examples
    torchrun --nproc_per_node 8 train.py --config stage1_large_h100 --train-csv my.csv --train-root /data

The loop below drives named components, each in ``tokenizer_training/``: the training data (CSV or shards, with a
resumable position), the trainer (networks, declared loss terms, optimisers, schedule; one ``step``), the
checkpointer (the checkpoint dict, atomic writes, resume), the step logger (console, metrics.jsonl, wandb,
loss curves), the reconstruction grids and the stop requests (SIGTERM / Ctrl-C honoured between steps).
``--resume auto`` continues the same run exactly (same order, same augmentations, same RNG on every rank).
"""
from __future__ import annotations

import sys
from pathlib import Path

import meditok
from meditok.data import MedicalImageError
from training import distributed as dist
from tokenizer_training.args import parse_args
from tokenizer_training import checkpointing
from tokenizer_training.monitor import ReconstructionGrids, StepLogger
from tokenizer_training.preflight import check_networks
from training.checkpoint_files import RunError
from training.stopping import StopRequests
from tokenizer_training.runtime import setup_runtime
from tokenizer_training.schedule import Schedule
from tokenizer_training.trainer import Trainer
from tokenizer_training.training_data import TrainingData


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup_runtime(args)
    run_dir = Path(args.output_dir)
    check_networks(args)  # every missing teacher / loss network named at once, before anything is built
    stops, stopped, logger, data, checkpointer = None, "", None, None, None
    try:
        checkpointer = checkpointing.checkpointer(args, run_dir)  # locks the run folder first
        trainer = Trainer(args, device)
        data = TrainingData(args, trainer.img_size, trainer.text_tokenizer, run_dir, dist.rank(), dist.world_size(),
                            device.type)
        trainer.schedule = schedule = Schedule.from_args(args, data.steps_per_epoch)
        step = checkpointer.restore(trainer, data)
        trainer.wrap_for_ddp()
        if dist.is_main():
            args.save(run_dir / "args.json")
        logger = StepLogger(args, run_dir, schedule.total_steps, step, trainer.train_flops_per_image,
                            trainer.peak_flops, device, dist.is_main(), dist.world_size(), checkpointer.newest_healthy)
        grids = ReconstructionGrids(args, run_dir, data, trainer, dist.is_main())
        logger.print(f"[train] stage {args.stage}, preset {trainer.tokenizer.config.preset} at {trainer.img_size}px, "
                     f"{dist.world_size()} process(es) on {device.type}, {'bf16' if trainer.bf16 else 'fp32'}; "
                     f"{schedule.total_steps} steps ({data.steps_per_epoch}/epoch), global batch "
                     f"{args.batch_size * dist.world_size() * args.grad_accum}; losses: {trainer.losses_summary()}; "
                     f"output {run_dir}")
        stops = StopRequests(args.log_every, args.stop_at_step, "train")
        while step < schedule.total_steps and not stopped:
            batches = data.next_batches(args.grad_accum)
            logs = trainer.step(batches, step)
            step += 1
            if logger.after_step(step, logs, batches, trainer.lr, data.epoch, data.bad_samples) is not None:
                checkpointer.mark_healthy(step)  # a finite step after the newest checkpoint vouches for it
            grids.maybe_save(step, schedule.total_steps)
            stopped = stops.should_stop(step, schedule.total_steps, device)
            if (args.save_every and step % args.save_every == 0 and step < schedule.total_steps) or stopped:
                checkpointer.save(step, trainer, data)
        if stopped:
            logger.print(f"[train] stopped ({stopped}) at step {step}/{schedule.total_steps}: checkpoint saved; "
                         f"`--resume auto` continues from here")
        else:
            checkpointer.save(step, trainer, data)
            if dist.is_main():
                meditok.save_meditok(trainer.tokenizer, run_dir / "tokenizer")
                if trainer.ema is not None:
                    meditok.save_meditok(trainer.ema.module, run_dir / "tokenizer_ema")
            logger.finish(step)
            logger.print(f"[train] tokenizer → {run_dir / 'tokenizer'}; {data.bad_samples} bad sample(s) skipped")
    except (FloatingPointError, MedicalImageError, RunError) as error:  # the non-finite stop, --on-bad-sample
        # raise, a refused run folder or a full disk: one message
        print(f"[train] error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        for part in (data, stops, logger, checkpointer):  # data first: its workers must end before the interpreter
            if part is not None:
                part.close()
        dist.cleanup()
    return stops.final_exit_code(stopped)


if __name__ == "__main__":
    sys.exit(main())
