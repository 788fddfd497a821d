"""Train the MedITok tokenizer, stage 1 (visual alignment) or stage 2 (textual alignment). SPEC §2.

    python train.py --config stage1_tiny_cpu                     # CPU try-out on datasets/examples
    torchrun --nproc_per_node 8 train.py --config stage1_large_h100 --train_csv my.csv --train_root /data

Per step: the tokenizer reconstructs the batch; L_nll = 0.2·L1 + L2 + LPIPS; the generator's hinge
term through the DINO discriminator gets the adaptive weight at the decoder's last layer; the VQ loss;
and the contrastive loss between the tokenizer's alignment features and the frozen teacher's
(BiomedCLIP image trunk in stage 1, its text tower in stage 2), gathered over all ranks. Then the
discriminator takes a hinge + BCR step. Checkpoints are atomic and ``--resume auto`` continues the
same run exactly (same order, same augmentations, same RNG).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

import meditok
from utilities import dist
from utilities.args import Args, parse_args
from utilities.checkpointing import (FORMAT, atomic_torch_save, checkpoint_path, find_resume_checkpoint,
                                     list_checkpoints, load_checkpoint, prune_checkpoints, rng_state,
                                     set_rng_state)
from utilities.monitor import MetricsLog, Throughput, format_eta, plot_loss_curves, save_reconstruction_grid
from utilities.trainer import Trainer
from utilities.training_data import PerSampleSeeded, build_loader, set_loader_position, steps_per_epoch


def pick_device(args: Args) -> torch.device:
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return dist.init_distributed(kind)


def build_dataset(args: Args, img_size: int, tokenizer_fn, run_dir: Path):
    from meditok.data import CSVImageDataset, RandomCTWindow, ShardedImageDataset, stage1_augmentation
    common = dict(transform=stage1_augmentation(img_size), tokenizer=tokenizer_fn, ct_window=RandomCTWindow(),
                  on_error=args.on_bad_sample, error_log_dir=run_dir)
    if args.train_shards:
        return ShardedImageDataset(args.train_shards, shuffle=True, seed=args.seed, repeat=True, **common)
    dataset = CSVImageDataset(args.train_csv, root=args.train_root or None, image_column=args.image_column,
                              caption_column=args.caption_column, modality_column=args.modality_column,
                              sep=args.csv_sep, **common)
    return PerSampleSeeded(dataset, args.seed)


def visual_batch(args: Args, img_size: int, n: int = 6) -> torch.Tensor:
    """Up to n training images without augmentation, one per modality first, for the reconstruction grids."""
    from meditok.data import CSVImageDataset, eval_transform
    if args.train_shards:
        return torch.empty(0)
    ds = CSVImageDataset(args.train_csv, root=args.train_root or None, transform=eval_transform(img_size),
                         image_column=args.image_column, caption_column=args.caption_column,
                         modality_column=args.modality_column, sep=args.csv_sep, on_error="skip")
    first_of_each = list({m: i for i, m in reversed(list(enumerate(ds.modalities)))}.values())[::-1]
    rows = (first_of_each + [i for i in range(len(ds)) if i not in first_of_each])[:n]
    return torch.stack([ds[i]["image"] for i in rows])


def log(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


class Stop(Exception):
    """Raised by SIGTERM/SIGINT handlers: finish the step, save, exit."""


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    rank, world = dist.rank(), dist.world_size()
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(args, device)
    tokenizer, img_size = trainer.tokenizer, trainer.img_size

    # --- data -------------------------------------------------------------------------------------
    dataset = build_dataset(args, img_size, trainer.text_tokenizer, run_dir)
    if args.train_shards:
        from torch.utils.data import DataLoader
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True)
        samples = args.samples_per_epoch or dataset.num_samples  # index.json of write_shards knows it
        if not args.max_steps and not samples:
            raise ValueError(f"{args.train_shards}: the number of samples is unknown (no index.json); pass "
                             f"--samples_per_epoch or --max_steps")
        per_epoch = max(1, (samples or 0) // (args.batch_size * world * args.grad_accum))
    else:
        loader = build_loader(dataset, args.batch_size, args.num_workers, args.seed, rank, world, device.type)
        per_epoch = steps_per_epoch(loader, args.grad_accum)
        if per_epoch == 0:
            raise ValueError(f"{args.train_csv}: {len(dataset)} images give no full batch of {args.batch_size} × "
                             f"{world} ranks × {args.grad_accum} accumulation; lower --batch_size")
    total_steps = args.max_steps or math.ceil(args.epochs * per_epoch)
    warmup_steps = round(args.warmup_epochs * per_epoch)
    disc_start = round(args.disc_start_epochs * per_epoch)
    disc_warmup = round(args.disc_warmup_epochs * per_epoch)

    # --- resume -----------------------------------------------------------------------------------
    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = None
    if not args.resume and list_checkpoints(run_dir):
        raise SystemExit(f"{run_dir} already holds checkpoints of a run ({list_checkpoints(run_dir)[0].name}). "
                         f"Continue it with --resume auto, or pick another --output_dir (nothing was overwritten).")
    if args.resume == "auto":
        ckpt = find_resume_checkpoint(run_dir)
        if ckpt is None:
            log(f"[resume] no checkpoint in {run_dir}: starting fresh")
    elif args.resume:
        ckpt = load_checkpoint(Path(args.resume))
        ckpt["_path"] = args.resume
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        log(f"[resume] {ckpt['_path']}: step {step}, epoch {epoch}, batch {batch_in_epoch}")
    trainer.wrap_for_ddp()

    if dist.is_main():
        args.save(run_dir / "args.json")
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main())
    vis_images = visual_batch(args, img_size).to(device) if dist.is_main() and args.vis_every > 0 else None
    wandb_run = None
    if args.report_wandb and dist.is_main():
        import wandb
        wandb_run = wandb.init(project=args.wandb_project, name=run_dir.name, dir=str(run_dir), config=args.to_dict(),
                               id=run_dir.name.replace("/", "_"), resume="allow")

    def save(at_step: int) -> None:
        if not dist.is_main():
            return
        state = {"format": FORMAT, **trainer.state_dict(), "step": at_step, "epoch": epoch,
                 "batch_in_epoch": batch_in_epoch, "rng": rng_state(), "args": args.to_dict()}
        atomic_torch_save(state, checkpoint_path(run_dir, at_step))
        prune_checkpoints(run_dir, args.keep_checkpoints)

    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True
    signal.signal(signal.SIGTERM, request_stop)

    # --- loop -------------------------------------------------------------------------------------
    log(f"[train] stage {args.stage}, preset {tokenizer.config.preset} at {img_size}px, {world} process(es) on "
        f"{device.type}, {'bf16' if trainer.bf16 else 'fp32'}; {total_steps} steps ({per_epoch}/epoch), global "
        f"batch {args.batch_size * world * args.grad_accum}; losses: {trainer.losses_summary()}; output {run_dir}")
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    if not args.train_shards:
        set_loader_position(loader, epoch, batch_in_epoch * args.grad_accum)
    else:
        loader.dataset.set_epoch(epoch)
    data_iter = iter(loader)
    throughput = Throughput()
    t_start, step_start = time.perf_counter(), step
    bad_samples = 0
    interrupted = planned = False
    progress = None
    if dist.is_main():
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def next_batch():
        nonlocal data_iter, epoch, batch_in_epoch
        try:
            return next(data_iter)
        except StopIteration:
            epoch, batch_in_epoch = epoch + 1, 0
            if not args.train_shards:
                set_loader_position(loader, epoch, 0)
            data_iter = iter(loader)
            return next(data_iter)

    try:
        while step < total_steps:
            batches = [next_batch() for _ in range(args.grad_accum)]
            batch_in_epoch += 1
            for batch in batches:
                bad_samples += int(batch["bad_samples_skipped"].sum()) if "bad_samples_skipped" in batch else 0
                throughput.add(batch["image"].shape[0] * world)
            logs, grad_norm, lr = trainer.step(batches, step, total_steps, warmup_steps, disc_start, disc_warmup)
            step += 1
            if progress is not None:
                progress.update(1)

            if step % args.log_every == 0 or step == total_steps:
                keys = list(logs)  # one collective and one host sync for all logged values
                values = dict(zip(keys, dist.all_reduce_mean(torch.stack([logs[k].float() for k in keys])).tolist()))
                if not math.isfinite(values["loss/total"]):
                    raise FloatingPointError(f"non-finite loss at step {step}: "
                                             + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                                             + f". The last checkpoint in {run_dir} is intact; lower --lr or check the data.")
                rate = throughput.rate()
                elapsed = time.perf_counter() - t_start
                eta = elapsed / max(step - step_start, 1) * (total_steps - step)
                record = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": float(grad_norm),
                          "images_per_s": rate, "tokenizer_tflops": trainer.train_flops_per_image * rate / 1e12,
                          "bad_samples": bad_samples, **values}
                if trainer.peak_flops:
                    record["mfu"] = trainer.train_flops_per_image * rate / trainer.peak_flops
                if device.type == "cuda":
                    record["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
                metrics.write(record)
                if wandb_run is not None:
                    wandb_run.log(record, step=step)
                line = (f"step {step}/{total_steps} ep {epoch} | L1 {values['loss/rec_l1']:.4f} "
                        f"L2 {values['loss/rec_l2']:.4f} lpips {values['loss/lpips']:.4f} vq {values['loss/vq']:.4f} "
                        f"con {values['loss/contrast']:.3f} adv {values['loss/g_adv']:.3f}×{values['adv_weight']:.3g} "
                        f"D {values.get('loss/disc', 0):.3f} | usage {values['codebook_usage']:.1f}% lr {lr:.2e} | "
                        f"{rate:.1f} img/s" + (f" MFU {record['mfu']:.1%}" if trainer.peak_flops else "")
                        + (f" mem {record['gpu_peak_memory_gb']:.1f}G" if device.type == "cuda" else "")
                        + f" ETA {format_eta(eta)}")
                if progress is not None and not progress.disable:
                    progress.set_postfix_str(line.split("| ", 1)[1][:120])
                log(line)
            if vis_images is not None and args.vis_every > 0 and (step % args.vis_every == 0 or step == total_steps):
                tokenizer.eval()
                with torch.no_grad(), trainer.autocast():
                    recon = tokenizer.img_to_reconstructed_img(vis_images)
                tokenizer.train()
                save_reconstruction_grid(vis_images, recon, run_dir / "vis" / f"step{step:08d}.png", f"step {step}")
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save(step)
            if stop["requested"]:
                raise Stop("SIGTERM")
            if args.stop_at_step and args.stop_at_step <= step < total_steps:
                raise Stop("--stop_at_step")
    except (KeyboardInterrupt, Stop) as reason:
        interrupted = True
        planned = isinstance(reason, Stop) and str(reason) == "--stop_at_step"
        log(f"\n[train] stopped ({reason or 'interrupted'}) at step {step}/{total_steps}: saving a checkpoint; "
            f"`--resume auto` continues from here")
        save(step)
    finally:
        if progress is not None:
            progress.close()

    if not interrupted:
        save(step)
        if dist.is_main():
            meditok.save_meditok(tokenizer, run_dir / "tokenizer")
            if trainer.ema is not None:
                meditok.save_meditok(trainer.ema.module, run_dir / "tokenizer_ema")
            curves = plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")
            log(f"[train] done: {step} steps in {format_eta(time.perf_counter() - t_start)}; tokenizer → "
                f"{run_dir / 'tokenizer'}; curves → {curves}; {bad_samples} bad sample(s) skipped")
    if wandb_run is not None:
        wandb_run.finish()
    dist.cleanup()
    return 0 if (not interrupted or planned) else 130


if __name__ == "__main__":
    sys.exit(main())
