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

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import meditok
from utilities import dist
from utilities.args import Args, parse_args
from utilities.checkpointing import (FORMAT, atomic_torch_save, checkpoint_path, find_resume_checkpoint,
                                     list_checkpoints, load_checkpoint, prune_checkpoints, rng_state,
                                     set_rng_state)
from utilities.losses import (adaptive_adversarial_weight, bcr_loss, clip_contrastive_loss, hinge_d_loss,
                              hinge_g_loss, linear_warmup)
from utilities.monitor import MetricsLog, Throughput, format_eta, plot_loss_curves, save_reconstruction_grid
from utilities.schedule import cosine_lr
from utilities.training_data import PerSampleSeeded, build_loader, set_loader_position, steps_per_epoch


class AlignmentHead(nn.Module):
    """f_vision / f_text of SPEC §2: LayerNorm + linear from the teacher's width to the tokenizer's 768."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, out_dim)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(x.float())), dim=-1)


class CaptionTokenizer:
    """str → LongTensor [context_length] for the dataset (the teacher's tokenizer works on lists)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, caption: str) -> torch.Tensor:
        return self.tokenizer([caption])[0]


class TrainingModel(nn.Module):
    """Tokenizer + alignment head in one module, so one DDP wrapper syncs both."""

    def __init__(self, tokenizer: meditok.MedITok, head: Optional[AlignmentHead]):
        super().__init__()
        self.tokenizer = tokenizer
        self.head = head

    def forward(self, images: torch.Tensor, teacher_features: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = self.tokenizer(images)
        if self.head is not None and teacher_features is not None:
            out["target_features"] = self.head(teacher_features)
        return out


# ----------------------------------------------------------------------------------------------------
# Setup

def known_peak_flops(device: torch.device, bf16: bool) -> float:
    """Dense bf16 peak of GPUs we know (for the MFU in the logs); 0 when unknown or not bf16."""
    if device.type != "cuda" or not bf16:
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0)):
        if key in name:
            return tflops * 1e12
    return 0.0


def pick_device(args: Args) -> torch.device:
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return dist.init_distributed(kind)


def build_tokenizer(args: Args, device: torch.device) -> tuple:
    """Tokenizer from --init_from (weights file/folder or a previous run folder) or from scratch.
    Returns (tokenizer, discriminator-heads state or None)."""
    disc_state = None
    overrides = {"img_size": args.img_size} if args.img_size else {}
    if args.init_from:
        source = Path(args.init_from)
        if source.is_dir() and list_checkpoints(source):  # a previous run: its newest checkpoint
            ckpt = load_checkpoint(list_checkpoints(source)[0])
            tokenizer = meditok.load_meditok(list_checkpoints(source)[0], img_size=args.img_size or None)
            disc_state = ckpt.get("disc")
        else:
            tokenizer = meditok.load_meditok(args.init_from, img_size=args.img_size or None)
        if tokenizer.config.preset != args.preset:
            log(f"[init] --init_from holds a {tokenizer.config.preset!r} tokenizer; --preset {args.preset!r} ignored")
    else:
        torch.manual_seed(args.seed)
        tokenizer = meditok.build_meditok(args.preset, **overrides)
        if args.encoder_init:
            enc = meditok.load_meditok(args.encoder_init).encoder.state_dict()
            tokenizer.encoder.load_state_dict(enc, strict=True)
    return tokenizer.to(device).train(), disc_state


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
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    # --- networks ---------------------------------------------------------------------------------
    tokenizer, disc_state = build_tokenizer(args, device)
    tokenizer.set_grad_checkpointing(args.grad_ckpt)
    img_size = args.img_size or tokenizer.config.img_size
    teacher = text_tokenizer = None
    if args.use_contrast and args.contrast > 0:
        import local_openclip
        if args.stage == 1:
            teacher = local_openclip.load_vision_teacher(args.biomedclip or None, device=device)
        else:
            teacher = local_openclip.load_text_teacher(args.biomedclip or None, device=device)
            text_tokenizer = CaptionTokenizer(local_openclip.load_tokenizer(args.biomedclip or None))
    head = AlignmentHead(teacher.output_dim, tokenizer.config.embed_dim).to(device) if teacher is not None else None
    model = TrainingModel(tokenizer, head)
    lpips = None
    if args.use_lpips and args.lpips_weight > 0:
        from utilities.perceptual import build_lpips
        lpips = build_lpips(args.lpips_vgg or None, device=device)
    disc = None
    if args.use_disc:
        from utilities.diffaug import diff_augment
        from utilities.discriminator import build_discriminator
        disc = build_discriminator(args.dino or None, device=device)
        if disc_state is not None:
            disc.heads.load_state_dict(disc_state)

    # Model FLOPs utilisation of the tokenizer's step (forward + backward ≈ 3 × forward, FLOPs counted by
    # torch.utils.flop_counter); the loss networks' FLOPs are not counted, so this is a lower bound.
    from meditok.info import forward_flops
    train_flops_per_image = 3 * sum(forward_flops(tokenizer, img_size).values())
    peak_flops = args.peak_tflops * 1e12 or known_peak_flops(device, bf16)

    # --- data -------------------------------------------------------------------------------------
    dataset = build_dataset(args, img_size, text_tokenizer, run_dir)
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

    # --- optimisers -------------------------------------------------------------------------------
    fused = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases, logit scale: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=tuple(args.betas), eps=args.eps, fused=fused)
    disc_opt = None
    if disc is not None:
        disc_opt = torch.optim.AdamW(disc.heads.parameters(), lr=args.disc_lr, betas=tuple(args.disc_betas),
                                     weight_decay=args.disc_weight_decay, fused=fused)
    ema = None
    if args.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(tokenizer, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))

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
        tokenizer.load_state_dict(ckpt["model"], strict=True)
        if head is not None and ckpt.get("heads") is not None:
            head.load_state_dict(ckpt["heads"])
        opt.load_state_dict(ckpt["optimizer"])
        if disc is not None and ckpt.get("disc") is not None:
            disc.heads.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_optimizer"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        tokenizer.quantizer.usage_updates = ckpt.get("usage_updates", step)
        log(f"[resume] {ckpt['_path']}: step {step}, epoch {epoch}, batch {batch_in_epoch}")

    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=head is None) if world > 1 else model
    # DDP syncs the heads only: the frozen DINO has no gradients to reduce
    ddp_disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if (disc and world > 1) else disc

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
        state = {
            "format": FORMAT, "config": tokenizer.config.to_dict(), "model": tokenizer.state_dict(),
            "heads": head.state_dict() if head is not None else None,
            "optimizer": opt.state_dict(),
            "disc": disc.heads.state_dict() if disc is not None else None,
            "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "step": at_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "usage_updates": tokenizer.quantizer.usage_updates, "rng": rng_state(), "args": args.to_dict(),
        }
        atomic_torch_save(state, checkpoint_path(run_dir, at_step))
        prune_checkpoints(run_dir, args.keep_checkpoints)

    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True
    signal.signal(signal.SIGTERM, request_stop)

    # --- loop -------------------------------------------------------------------------------------
    log(f"[train] stage {args.stage}, preset {tokenizer.config.preset} at {img_size}px, {world} process(es) on "
        f"{device.type}, {'bf16' if bf16 else 'fp32'}; {total_steps} steps ({per_epoch}/epoch), global batch "
        f"{args.batch_size * world * args.grad_accum}; losses: L1/L2{'/LPIPS' if lpips else ''}/VQ"
        f"{'/adv+BCR' if disc else ''}{'/contrast×%g' % args.contrast if teacher is not None else ''}; "
        f"output {run_dir}")
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
    last_layer = tokenizer.decoder.last_layer
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
            lr = cosine_lr(step, total_steps, args.lr, args.lr_end, warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            disc_step = step - disc_start
            disc_on = disc is not None and disc_step >= 0
            disc_warm = linear_warmup(disc_step, disc_warmup) if disc_on else 0.0
            if disc_opt is not None:
                for g in disc_opt.param_groups:
                    g["lr"] = cosine_lr(max(disc_step, 0), max(total_steps - disc_start, 1), args.disc_lr,
                                        args.disc_lr_end, 0)
            logs: Dict[str, torch.Tensor] = {}
            for micro in range(args.grad_accum):
                batch = next_batch()
                batch_in_epoch += 1 if micro == args.grad_accum - 1 else 0
                images = batch["image"].to(device, non_blocking=True)
                bad_samples += int(batch["bad_samples_skipped"].sum()) if "bad_samples_skipped" in batch else 0
                sync = contextlib.nullcontext() if (world == 1 or micro == args.grad_accum - 1) else ddp_model.no_sync()
                with sync:
                    teacher_features = None
                    if teacher is not None:
                        with torch.no_grad(), autocast():
                            inputs = images if args.stage == 1 else batch["text"].to(device)
                            teacher_features = teacher(inputs).float()
                    with autocast():
                        out = ddp_model(images, teacher_features)
                    rec = out["reconstruction"].float()
                    l1 = F.l1_loss(rec, images)
                    l2 = F.mse_loss(rec, images)
                    nll = args.l1_weight * l1 + args.l2_weight * l2
                    lp = torch.zeros((), device=device)
                    if lpips is not None:
                        with autocast():
                            lp = lpips(rec, images).float().mean()
                        nll = nll + args.lpips_weight * lp
                    loss = nll + args.vq_weight * out["vq_loss"]
                    contrast = torch.zeros((), device=device)
                    if teacher is not None:
                        contrast = clip_contrastive_loss(out["image_features"].float(), out["target_features"],
                                                         out["logit_scale"])
                        loss = loss + args.contrast * contrast
                    g_adv = adv_w = torch.zeros((), device=device)
                    if disc_on and disc_warm > 0:
                        # generator side: gradients reach the image, not the heads (released: D in eval mode here)
                        disc.heads.requires_grad_(False)
                        disc.eval()
                        with autocast():
                            g_adv = hinge_g_loss(disc(diff_augment(rec, cutout=args.diffaug_cutout)).float())
                        disc.train()
                        adv_w = adaptive_adversarial_weight(nll, g_adv, last_layer, args.adv_weight, disc_warm,
                                                            tuple(args.adv_clamp))
                        loss = loss + adv_w * g_adv
                    (loss / args.grad_accum).backward()

                    if disc_on and disc_warm > 0:
                        disc.heads.requires_grad_(True)
                        fake = rec.detach()
                        h, w = images.shape[-2:]
                        # one crop/resize choice per real/fake pair, shared with its BCR copy so that
                        # D(x) and D(T(x)) are compared token by token
                        fit_real, fit_fake = disc.draw_fit(h, w), disc.draw_fit(h, w)
                        with autocast():
                            real_logits = ddp_disc(diff_augment(images, cutout=args.diffaug_cutout), fit=fit_real).float()
                            fake_logits = ddp_disc(diff_augment(fake, cutout=args.diffaug_cutout), fit=fit_fake).float()
                            d_loss = hinge_d_loss(real_logits, fake_logits)
                            bcr = torch.zeros((), device=device)
                            if args.bcr_weight > 0:
                                real_aug = ddp_disc(diff_augment(images, cutout=args.bcr_cutout), fit=fit_real).float()
                                fake_aug = ddp_disc(diff_augment(fake, cutout=args.bcr_cutout), fit=fit_fake).float()
                                bcr = bcr_loss(real_logits, real_aug, fake_logits, fake_aug)
                        # as released: the warm-up scales the generator's adversarial weight; D trains fully
                        ((d_loss + args.bcr_weight * bcr) / args.grad_accum).backward()
                        logs.update({"loss/disc": d_loss.detach(), "loss/bcr": bcr.detach(),
                                     "disc/acc_real": (real_logits.detach() > 0).float().mean(),
                                     "disc/acc_fake": (fake_logits.detach() < 0).float().mean()})
                logs.update({"loss/rec_l1": l1.detach(), "loss/rec_l2": l2.detach(), "loss/lpips": lp.detach(),
                             "loss/vq": out["vq_loss"].detach(), "loss/contrast": contrast.detach(),
                             "loss/g_adv": g_adv.detach(), "adv_weight": adv_w.detach(),
                             "codebook_usage": out["codebook_usage"].detach(), "loss/total": loss.detach()})
                throughput.add(images.shape[0] * world)

            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if disc_on and disc_warm > 0:
                disc_opt.step()
                disc_opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                tokenizer.logit_scale.clamp_(0, math.log(100))
            if ema is not None:
                ema.update_parameters(tokenizer)
            step += 1
            if progress is not None:
                progress.update(1)

            if step % args.log_every == 0 or step == total_steps:
                values = {k: float(dist.all_reduce_mean(v)) for k, v in logs.items()}
                if not math.isfinite(values["loss/total"]):
                    raise FloatingPointError(f"non-finite loss at step {step}: "
                                             + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                                             + f". The last checkpoint in {run_dir} is intact; lower --lr or check the data.")
                rate = throughput.rate()
                elapsed = time.perf_counter() - t_start
                eta = elapsed / max(step - step_start, 1) * (total_steps - step)
                record = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": float(grad_norm),
                          "images_per_s": rate, "tokenizer_tflops": train_flops_per_image * rate / 1e12,
                          "bad_samples": bad_samples, **values}
                if peak_flops:
                    record["mfu"] = train_flops_per_image * rate / peak_flops
                if device.type == "cuda":
                    record["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
                metrics.write(record)
                if wandb_run is not None:
                    wandb_run.log(record, step=step)
                line = (f"step {step}/{total_steps} ep {epoch} | L1 {values['loss/rec_l1']:.4f} "
                        f"L2 {values['loss/rec_l2']:.4f} lpips {values['loss/lpips']:.4f} vq {values['loss/vq']:.4f} "
                        f"con {values['loss/contrast']:.3f} adv {values['loss/g_adv']:.3f}×{values['adv_weight']:.3g} "
                        f"D {values.get('loss/disc', 0):.3f} | usage {values['codebook_usage']:.1f}% lr {lr:.2e} | "
                        f"{rate:.1f} img/s" + (f" MFU {record['mfu']:.1%}" if peak_flops else "")
                        + (f" mem {record['gpu_peak_memory_gb']:.1f}G" if device.type == "cuda" else "")
                        + f" ETA {format_eta(eta)}")
                if progress is not None and not progress.disable:
                    progress.set_postfix_str(line.split("| ", 1)[1][:120])
                log(line)
            if vis_images is not None and args.vis_every > 0 and (step % args.vis_every == 0 or step == total_steps):
                tokenizer.eval()
                with torch.no_grad(), autocast():
                    recon = tokenizer.img_to_reconstructed_img(vis_images)
                tokenizer.train()
                save_reconstruction_grid(vis_images, recon, run_dir / "vis" / f"step{step:08d}.png", f"step {step}")
            if step % args.save_every == 0 and step < total_steps:
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
            if ema is not None:
                meditok.save_meditok(ema.module, run_dir / "tokenizer_ema")
            curves = plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")
            log(f"[train] done: {step} steps in {format_eta(time.perf_counter() - t_start)}; tokenizer → "
                f"{run_dir / 'tokenizer'}; curves → {curves}; {bad_samples} bad sample(s) skipped")
    if wandb_run is not None:
        wandb_run.finish()
    dist.cleanup()
    return 0 if (not interrupted or planned) else 130


if __name__ == "__main__":
    sys.exit(main())
