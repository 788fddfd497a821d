"""The training step of docs/method.md §2 and everything it needs: tokenizer, alignment heads, frozen teachers,
LPIPS, DINO discriminator, optimisers, EMA, and the run's schedule. ``train.py`` drives it over the data;
the step benchmark (``python -m tokenizer_training.benchmark``) drives it over synthetic batches.

One step (``Trainer.step``), per micro-batch of the gradient accumulation:
  generator: L = 0.2·L1 + L2 + LPIPS (= L_nll) + VQ + w_c·contrast + λ_adv·hinge_G(D(aug(x̂))),
             λ_adv adaptive at the decoder's last layer (VQGAN), warmed up; backward.
             The contrastive term is against the image teacher (stage 1) or the text teacher (stage 2);
             stage 3, the one-stage ablation, has both (``contrast_vision`` and ``contrast_text``).
  discriminator: hinge(D(aug(x)), D(aug(x̂))) + 4·BCR; backward.
then clipped AdamW steps, logit-scale clamp, EMA update.

The generator's terms are declared (``Trainer.loss_terms``: name, kind, weight, function); a term of
weight 0 is not declared and its network is not built. A new term is one more declaration.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import meditok
from training.flops import peak_flops
from training.optim import adamw
from training import distributed as dist
from .args import Args
from meditok.seeding import rank_seed

from .checkpointing import list_checkpoints, load_checkpoint
from .diffaug import diff_augment
from .losses import (GeneratorObjective, LossKind, LossTerm, adaptive_adversarial_weight, bcr_loss,
                     clip_contrastive_loss, hinge_d_loss, hinge_g_loss)
from .schedule import Schedule


class AlignmentHead(nn.Module):
    """f_vision / f_text of docs/method.md §2: LayerNorm + linear from the teacher's width to the tokenizer's 768."""

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


@dataclass
class Alignment:
    """One contrastive term of docs/method.md §2: a frozen teacher (``vision``: the image trunk, fed the batch's
    images; ``text``: the text tower, fed its caption ids) and the term's weight. Its trainable head
    (f_vision / f_text) lives in ``TrainingModel.heads[name]``."""
    name: str
    teacher: nn.Module
    weight: float

    def teacher_input(self, batch: Dict[str, Any], images: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.name == "vision":
            return images
        # all-padding columns are dropped while the ids are still on the host (no device sync)
        return self.teacher.trim_padding(batch["text"]).to(device, non_blocking=True)


class TrainingModel(nn.Module):
    """Tokenizer + alignment heads in one module, so one DDP wrapper syncs them all."""

    def __init__(self, tokenizer: meditok.MedITok, heads: Optional[Dict[str, AlignmentHead]] = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.heads = nn.ModuleDict(heads or {})

    def forward(self, images: torch.Tensor, teacher_features: Optional[Dict[str, torch.Tensor]] = None
                ) -> Dict[str, torch.Tensor]:
        """The tokenizer's outputs and, per teacher feature given, ``target_features/<name>`` = f_name(features)."""
        out = self.tokenizer(images)
        for name, features in (teacher_features or {}).items():
            out[f"target_features/{name}"] = self.heads[name](features)
        return out


def build_tokenizer(args: Args, device: torch.device) -> Tuple[meditok.MedITok, Optional[Dict[str, Any]]]:
    """Tokenizer from --init-from (weights file/folder or a previous run folder) or from scratch.
    Returns (tokenizer in train mode, discriminator-heads state of the previous run or None)."""
    disc_state = None
    if args.init_from:
        source = Path(args.init_from)
        if source.is_dir() and list_checkpoints(source):  # a previous run: its newest checkpoint, read once
            ckpt = load_checkpoint(list_checkpoints(source)[0])
            config = meditok.MedITokConfig.from_dict(ckpt["config"])
            tokenizer = meditok.build_meditok(config.replace(img_size=args.img_size) if args.img_size else config,
                                              empty=True)
            tokenizer.load_state_dict(ckpt["model"], strict=True, assign=True)
            disc_state = ckpt.get("disc")
        else:
            tokenizer = meditok.load_meditok(args.init_from, img_size=args.img_size or None)
        if tokenizer.config.preset != args.preset and dist.is_main():
            print(f"[init] --init-from holds a {tokenizer.config.preset!r} tokenizer; --preset {args.preset!r} ignored")
    else:
        torch.manual_seed(args.seed)
        tokenizer = meditok.build_meditok(args.preset, **({"img_size": args.img_size} if args.img_size else {}))
        if args.encoder_init:
            tokenizer.encoder.load_state_dict(meditok.load_meditok(args.encoder_init).encoder.state_dict(), strict=True)
    return tokenizer.to(device).train(), disc_state


class Trainer:
    """Networks, optimisers and the training step for one process (see module docstring)."""

    def __init__(self, args: Args, device: torch.device):
        self.args, self.device = args, device
        self.world = dist.world_size()
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        tokenizer, disc_state = build_tokenizer(args, device)
        tokenizer.set_grad_checkpointing(args.grad_ckpt, args.grad_ckpt_parts)
        self.tokenizer = tokenizer
        self.img_size = args.img_size or tokenizer.config.img_size

        self.text_tokenizer = None  # caption → ids, for the data; set when a text teacher is used
        self.alignments = self._load_alignments()
        self.model = TrainingModel(tokenizer, {a.name: AlignmentHead(a.teacher.output_dim, tokenizer.config.embed_dim)
                                               .to(device) for a in self.alignments})
        self.heads = self.model.heads  # one ModuleDict, not a second record of the heads
        self.lpips = None
        if args.lpips_weight > 0:
            from .perceptual import build_lpips
            self.lpips = build_lpips(args.lpips_vgg or None, device=device)
        self.disc = None
        if args.adv_weight > 0:
            from .discriminator import build_discriminator
            self.disc = build_discriminator(args.dino or None, device=device)
            if disc_state is not None:
                self.disc.heads.load_state_dict(disc_state)
        self.loss_terms = self._declare_loss_terms()

        self.fused = fused = device.type == "cuda"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # no weight decay on norms, biases and the logit scale
        self.opt = adamw(self.params, args.lr, args.weight_decay, tuple(args.betas), eps=args.eps, fused=fused)
        self.disc_opt = None
        if self.disc is not None:
            self.disc_opt = torch.optim.AdamW(self.disc.heads.parameters(), lr=args.disc_lr,
                                              betas=tuple(args.disc_betas), weight_decay=args.disc_weight_decay,
                                              fused=fused)
        self.ema = None
        if args.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(tokenizer, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
        self._speed_up()
        self.ddp_model: nn.Module = self.model
        self.ddp_disc: Optional[nn.Module] = self.disc
        self.schedule: Optional[Schedule] = None  # set by the driver once the data's length is known
        self.lr = args.lr
        # non-finite steps, counted on the device (no host sync per step; read with the logged values)
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=device)
        self.nonfinite_consecutive = torch.zeros((), dtype=torch.long, device=device)

        # MFU of the tokenizer's step (forward + backward ≈ 3 × forward, FLOPs counted by
        # torch.utils.flop_counter); the loss networks' FLOPs are not counted, so it is a lower bound.
        from meditok.info import forward_flops
        self.train_flops_per_image = 3 * sum(forward_flops(tokenizer, self.img_size).values())
        self.peak_flops = peak_flops(device, args.peak_tflops, self.bf16) or 0.0
        # Every network above was initialised from the same seed on every rank. From here on each rank
        # draws from its own stream (DiffAugment, the discriminator's crops): rank 0 continues the stream
        # that built the networks (so a one-process run is unchanged), the others switch to their own seed.
        if self.world > 1 and dist.rank() > 0:
            torch.manual_seed(rank_seed(args.seed, dist.rank()))

    def _load_alignments(self) -> List[Alignment]:
        """The stage's frozen teachers (stage 1: image, 2: text, 3: both; a weight of 0 loads none)."""
        args, alignments = self.args, []
        if args.vision_contrast <= 0 and args.text_contrast <= 0:
            return alignments
        import local_openclip
        if args.vision_contrast > 0:
            alignments.append(Alignment("vision", local_openclip.load_vision_teacher(
                args.biomedclip or None, device=self.device), args.vision_contrast))
        if args.text_contrast > 0:
            source = args.text_teacher_source or None
            alignments.append(Alignment("text", local_openclip.load_text_teacher(source, device=self.device),
                                        args.text_contrast))
            self.text_tokenizer = CaptionTokenizer(local_openclip.load_tokenizer(source))
        return alignments

    def alignment(self, name: str) -> Optional[Alignment]:
        """The ``vision`` or ``text`` alignment of this run, or None."""
        return next((a for a in self.alignments if a.name == name), None)

    def _speed_up(self) -> None:
        """--channels-last / --compile (--compile-form) / --upsample (after the EMA copy was made: that one stays
        a plain module)."""
        args = self.args
        self.tokenizer.speed_up(channels_last=args.channels_last, compile=args.compile and args.compile_form,
                                backend=args.compile_backend, upsample=args.upsample or None)
        if args.channels_last and self.lpips is not None:
            self.lpips.to(memory_format=torch.channels_last)
        if args.compile:
            for frozen in (self.lpips, self.disc.dino if self.disc is not None else None,
                           *(a.teacher for a in self.alignments)):
                if frozen is not None:
                    frozen.compile(backend=args.compile_backend)

    # --------------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def wrap_for_ddp(self) -> None:
        """Wrap in DDP when running several processes (after any checkpoint has been loaded)."""
        if self.world == 1:
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live in DDP's buckets (no copy, and no stride-mismatch warning)
        self.ddp_model = DDP(self.model, device_ids=ids, find_unused_parameters=not self.alignments,
                             gradient_as_bucket_view=True)
        if self.disc is not None:  # DDP syncs the heads only: the frozen DINO has no gradients to reduce
            self.ddp_disc = DDP(self.disc, device_ids=ids, gradient_as_bucket_view=True)

    def _declare_loss_terms(self) -> List[LossTerm]:
        """The generator's objective, term by term (weights from the arguments; 0 = not declared)."""
        args = self.args
        terms = [LossTerm("rec_l1", LossKind.IMAGE, args.l1_weight, F.l1_loss),
                 LossTerm("rec_l2", LossKind.IMAGE, args.l2_weight, F.mse_loss),
                 LossTerm("vq", LossKind.LATENT, args.vq_weight, lambda out: out["vq_loss"])]
        if self.lpips is not None:
            terms.append(LossTerm("lpips", LossKind.IMAGE, args.lpips_weight, self._lpips))
        masked = args.contrast_same_targets == "masked"
        for a in self.alignments:  # one alignment: "contrast" (the paper's stages); two: contrast_vision/_text
            name = "contrast" if len(self.alignments) == 1 else f"contrast_{a.name}"
            terms.append(LossTerm(name, LossKind.LATENT, a.weight, lambda out, key=f"target_features/{a.name}":
                                  clip_contrastive_loss(out["image_features"].float(), out[key].float(),
                                                        out["logit_scale"], masked)))
        if self.disc is not None:
            terms.append(LossTerm("g_adv", LossKind.ADVERSARIAL, args.adv_weight, self._generator_adversarial))
        return [t for t in terms if t.weight > 0]

    def losses_summary(self) -> str:
        return ", ".join(f"{t.name}×{t.weight:g}" + (" (adaptive)" if t.kind is LossKind.ADVERSARIAL else "")
                         for t in self.loss_terms) + (" + discriminator hinge/BCR" if self.disc is not None else "")

    def state_dict(self) -> Dict[str, Any]:
        """Everything of the networks and optimisers a checkpoint needs (the frozen networks excluded)."""
        return {
            "config": self.tokenizer.config.to_dict(), "model": self.tokenizer.state_dict(),
            "heads": self._heads_state(),
            "optimizer": self.opt.state_dict(),
            "disc": self.disc.heads.state_dict() if self.disc is not None else None,
            "disc_optimizer": self.disc_opt.state_dict() if self.disc_opt is not None else None,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "usage_updates": self.tokenizer.quantizer.usage_updates,
        }

    def load_state_dict(self, ckpt: Dict[str, Any]) -> None:
        self.tokenizer.load_state_dict(ckpt["model"], strict=True)
        if self.heads and ckpt.get("heads") is not None:
            self._load_heads_state(ckpt["heads"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.disc is not None and ckpt.get("disc") is not None:
            self.disc.heads.load_state_dict(ckpt["disc"])
            self.disc_opt.load_state_dict(ckpt["disc_optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.tokenizer.quantizer.usage_updates = ckpt.get("usage_updates", ckpt.get("step", 0))

    def _heads_state(self) -> Optional[Dict[str, Any]]:
        """The alignment heads for a checkpoint: one head's state dict as it is (the paper's stages; what
        ``evaluation.report_metrics.load_text_head`` reads), two as ``{"vision": …, "text": …}``."""
        if not self.heads:
            return None
        if len(self.heads) == 1:
            return next(iter(self.heads.values())).state_dict()
        return {name: head.state_dict() for name, head in self.heads.items()}

    def _load_heads_state(self, state: Dict[str, Any]) -> None:
        nested = all(isinstance(v, dict) for v in state.values())  # {"vision": {...}, "text": {...}}: --stage 3
        if len(self.heads) == 1:
            if nested:
                raise ValueError(f"the checkpoint has {len(state)} alignment heads ({sorted(state)}) but this run "
                                 f"trains one; resume it with the --stage (and contrast weights) it was trained with")
            next(iter(self.heads.values())).load_state_dict(state)
            return
        for name, head in self.heads.items():
            if not nested or name not in state:
                raise ValueError(f"the checkpoint has no '{name}' alignment head (its heads: {sorted(state)}); "
                                 f"resume it with the --stage it was trained with")
            head.load_state_dict(state[name])

    # --------------------------------------------------------------------------------------------
    def step(self, batches: List[Dict[str, Any]], step: int) -> Dict[str, torch.Tensor]:
        """One optimiser step (0-based ``step`` of ``self.schedule``) over ``len(batches)`` micro-batches
        (gradient accumulation).

        Each batch holds ``image`` [b, 3, H, W] in [-1, 1] and, with a text teacher, ``text`` token ids [b, L].
        Returns the logged values as 0-d tensors (no host sync here), ``grad_norm`` included; the learning
        rate of the step is ``self.lr``."""
        schedule = self.schedule
        self.lr = schedule.tokenizer_lr(step)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        disc_warm = schedule.disc_warmth(step) if self.disc is not None else 0.0
        disc_active = disc_warm > 0
        if self.disc_opt is not None:
            for g in self.disc_opt.param_groups:
                g["lr"] = schedule.disc_lr_at(step)
        logs: Dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(batches):
            with contextlib.ExitStack() as no_sync:
                if self.world > 1 and micro < len(batches) - 1:  # DDP all-reduces on the last micro-batch only
                    for wrapped in (self.ddp_model, self.ddp_disc):
                        if isinstance(wrapped, DDP):
                            no_sync.enter_context(wrapped.no_sync())
                logs.update(self.backward(batch, 1.0 / len(batches), disc_active, disc_warm))

        # 0 = no clipping (the norm is still measured for the log)
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip or float("inf"))
        self._update(logs, disc_active)
        with torch.no_grad():
            self.tokenizer.logit_scale.clamp_(0, math.log(100))
        if self.ema is not None:
            self.ema.update_parameters(self.tokenizer)
        return logs

    def _update(self, logs: Dict[str, torch.Tensor], disc_active: bool) -> None:
        """The optimiser steps, skipped for a non-finite step under ``--on-nonfinite skip``.

        Every step's finiteness (loss, discriminator loss, gradient norm) is counted on the device; the step
        logger reads the counters with the values it reduces anyway, so the check adds no host sync. Skipping
        is decided on the gradient norm alone: it is computed from gradients DDP has already averaged, so every
        rank takes the same decision (a NaN anywhere makes it NaN everywhere). Fused optimisers (CUDA) take the
        flag as ``found_inf`` and skip on the device; on the CPU the flag is read directly (a CPU tensor: no
        device to wait for)."""
        grads_finite = torch.isfinite(logs["grad_norm"])
        finite = grads_finite & torch.isfinite(logs["loss/total"])
        if "loss/disc" in logs:
            finite = finite & torch.isfinite(logs["loss/disc"])
        self.nonfinite_steps += (~finite).long()
        self.nonfinite_consecutive = (self.nonfinite_consecutive + 1) * (~finite).long()
        logs["nonfinite_steps"], logs["nonfinite_consecutive"] = self.nonfinite_steps, self.nonfinite_consecutive
        optimisers = [self.opt] + ([self.disc_opt] if disc_active else [])
        if self.args.on_nonfinite == "skip":
            if not self.fused and not bool(grads_finite):
                for opt in optimisers:
                    opt.zero_grad(set_to_none=True)
                return
            if self.fused:
                for opt in optimisers:
                    opt.found_inf = (~grads_finite).float()
        for opt in optimisers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def nonfinite_tensors(self) -> List[str]:
        """Names of trainable tensors (tokenizer, alignment head, discriminator heads) holding NaN/Inf; one
        host sync."""
        named = [(f"tokenizer.{k}", v) for k, v in self.tokenizer.state_dict().items() if v.is_floating_point()]
        for head_name, head in self.heads.items():
            named += [(f"head.{head_name}.{k}", v) for k, v in head.state_dict().items()]
        if self.disc is not None:
            named += [(f"disc.{k}", v) for k, v in self.disc.heads.state_dict().items() if v.is_floating_point()]
        flags = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()
        return [name for (name, _), ok in zip(named, flags) if not ok]

    # --------------------------------------------------------------------------------------------
    def backward(self, batch: Dict[str, Any], scale: float, disc_active: bool, disc_warm: float
                 ) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch for the tokenizer (+ head) and, when ``disc_active``, the
        discriminator heads; gradients are accumulated (× ``scale``). Returns the logged values (0-d tensors).

        The declared image-space terms are evaluated on a detached copy of the reconstruction x̂: their
        gradient w.r.t. x̂ is taken once, the adaptive weight is read from the image-space gradients pushed
        through the decoder's last conv only, and one backward pass then carries
        ∂L/∂x̂ = ∂L_nll/∂x̂ + λ_adv·∂L_adv/∂x̂ and the latent terms through the tokenizer
        (``GeneratorObjective``). This is the gradient of L = L_nll + latent terms + λ_adv·L_adv exactly
        (λ_adv is a constant of the step, as in VQGAN), with LPIPS and DINO differentiated once.
        """
        device, autocast = self.device, self.autocast
        images = batch["image"].to(device, non_blocking=True)
        teacher_features = {}
        with torch.no_grad(), autocast():
            for a in self.alignments:
                teacher_features[a.name] = a.teacher(a.teacher_input(batch, images, device)).float()
        with autocast():
            out = self.ddp_model(images, teacher_features)
        rec = out["reconstruction"].float()
        rec_in = rec.detach().requires_grad_(True)  # image-space terms are taken on this leaf copy of x̂

        values: Dict[str, torch.Tensor] = {}
        nll = latent = torch.zeros((), device=device)
        for term in self.loss_terms:
            if term.kind is LossKind.IMAGE:
                values[term.name] = term.fn(rec_in, images).float()
                nll = nll + term.weight * values[term.name]
            elif term.kind is LossKind.LATENT:
                values[term.name] = term.fn(out).float()
                latent = latent + term.weight * values[term.name]
        # (a run may declare no image-space term, e.g. all their weights 0: then ∂L/∂x̂ starts at zero)
        rec_grad = torch.autograd.grad(nll, rec_in)[0] if nll.requires_grad else torch.zeros_like(rec_in)
        objective = GeneratorObjective(rec_grad, latent)
        total = nll.detach() + latent.detach()
        logs: Dict[str, torch.Tensor] = {}
        adversarial = [t for t in self.loss_terms if t.kind is LossKind.ADVERSARIAL]
        if disc_active:
            for term in adversarial:
                g_adv = term.fn(rec_in)
                grad_adv = torch.autograd.grad(g_adv, rec_in)[0]
                # VQGAN's adaptive weight compares ∇L_nll and ∇L_adv at the last layer's weight: both come
                # from the image-space gradients through the last conv alone
                last_layer = self.tokenizer.decoder.last_layer
                nll_w, adv_w_grad = (torch.autograd.grad(rec, last_layer, grad_outputs=g, retain_graph=True)[0]
                                     for g in (objective.rec_grad, grad_adv))
                adv_w = adaptive_adversarial_weight(nll_w, adv_w_grad, term.weight, disc_warm,
                                                    tuple(self.args.adv_clamp))
                objective.rec_grad = objective.rec_grad + adv_w * grad_adv
                values[term.name], logs["adv_weight"] = g_adv.detach(), adv_w
                total = total + adv_w * g_adv.detach()
        objective.backward(rec, scale)

        logs.update({f"loss/{name}": v.detach() for name, v in values.items()})
        for term in adversarial:  # logged as 0 until the discriminator starts
            logs.setdefault(f"loss/{term.name}", torch.zeros((), device=device))
            logs.setdefault("adv_weight", torch.zeros((), device=device))
        logs["codebook_usage"] = out["codebook_usage"].detach()
        logs["loss/total"] = total
        if disc_active:
            logs.update(self._discriminator_backward(images, rec.detach(), scale))
        return logs

    def _lpips(self, rec: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.lpips(rec, images).float().mean()

    def _generator_adversarial(self, rec: torch.Tensor) -> torch.Tensor:
        """hinge_G(D(aug(x̂))): gradients reach the image, not the heads (the released code: D in eval mode)."""
        self.disc.heads.requires_grad_(False)
        self.disc.eval()
        with self.autocast():
            g_adv = hinge_g_loss(self.disc(diff_augment(rec, cutout=self.args.diffaug_cutout)).float())
        self.disc.train()
        self.disc.heads.requires_grad_(True)
        return g_adv

    def _discriminator_backward(self, images: torch.Tensor, fake: torch.Tensor, scale: float
                                ) -> Dict[str, torch.Tensor]:
        """Hinge loss + BCR for the heads; real, fake and their strongly augmented copies in one batched pass."""
        args = self.args
        h, w = images.shape[-2:]
        # one crop/resize choice per real/fake pair, shared with its BCR copy so that D(x) and D(T(x)) are
        # compared token by token
        fit_real, fit_fake = self.disc.draw_fit(h, w), self.disc.draw_fit(h, w)
        inputs = [diff_augment(images, cutout=args.diffaug_cutout), diff_augment(fake, cutout=args.diffaug_cutout)]
        fits = [fit_real, fit_fake]
        if args.bcr_weight > 0:
            inputs += [diff_augment(images, cutout=args.bcr_cutout), diff_augment(fake, cutout=args.bcr_cutout)]
            fits += [fit_real, fit_fake]
        with self.autocast():
            logits = [x.float() for x in self.ddp_disc(inputs, fit=fits)]
        real_logits, fake_logits = logits[:2]
        d_loss = hinge_d_loss(real_logits, fake_logits)
        bcr = bcr_loss(real_logits, logits[2], fake_logits, logits[3]) if args.bcr_weight > 0 else d_loss.new_zeros(())
        # as released: the warm-up scales the generator's adversarial weight; D trains fully
        ((d_loss + args.bcr_weight * bcr) * scale).backward()
        return {"loss/disc": d_loss.detach(), "loss/bcr": bcr.detach(),
                "disc/acc_real": (real_logits.detach() > 0).float().mean(),
                "disc/acc_fake": (fake_logits.detach() < 0).float().mean()}
