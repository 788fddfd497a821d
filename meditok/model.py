"""The MedITok tokenizer: encoder → attention projection → 8-codebook quantizer → projection → decoder.

Token API (method names kept from the released class so existing code keeps working):

====================================  ===============================================================
``img_to_idx(x)``                     [B, 3, H, W] in [-1, 1] → ids [B, 8, H/16·W/16] (int64)
``idx_to_img(ids)``                   ids [B, 8, L] or [B, 8, h, w] → image [B, 3, 16h, 16w] in [-1, 1]
``img_to_reconstructed_img(x)``       [B, 3, H, W] → reconstruction [B, 3, H, W] in [-1, 1]
``encode_image(x, normalize=False)``  [B, 3, H, W] → alignment embedding [B, 768]
``forward_features(x)``               [B, 3, H, W] → mean-pooled encoder features [B, vit_width]
``encode_image_vq(x)``                [B, 3, H, W] → quantized latent [B, L, 64] (unit-norm 8-d chunks)
====================================  ===============================================================

Aliases: ``tokenize`` = img_to_idx, ``detokenize`` = idx_to_img, ``reconstruct`` = img_to_reconstructed_img.
``forward`` is the training pass and returns everything the losses need.

The bottleneck (projections + quantizer) always runs in float32 with autocast off, as in the
released training code: cosine assignment over 4,096 codes is sensitive to bf16 rounding.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MedITokConfig
from .projection import AttentionProjection
from .quantizer import MultiCodebookQuantizer, QuantizerOutput, autocast_off
from .vitamin import ViTaminDecoder, ViTaminEncoder

MAX_LOGIT_SCALE = math.log(100.0)


def _compile_with_eager_fallback(module: nn.Module, name: str, dynamic: Optional[bool] = False,
                                 **compile_kwargs) -> None:
    """Compile ``module``'s forward in place (``dynamic=False``: one specialised graph per input shape); on a
    compilation error, warn and switch that module back to its eager forward for good.

    Dynamo's process-wide ``suppress_errors`` would do the fallback too, but for every compiled function in
    the process (a user's own ``torch.compile`` would then hide its errors); this catches them for this module
    only. Errors raised while compiling the backward graph (compiled lazily, at the first backward) are not
    caught here.
    """
    from torch._dynamo.exc import TorchDynamoException

    eager_forward = module.forward  # the class's forward, bound to this instance
    compiled_forward = torch.compile(eager_forward, dynamic=dynamic, **compile_kwargs)

    def forward(*args, **kwargs):
        try:
            return compiled_forward(*args, **kwargs)
        except TorchDynamoException as error:  # BackendCompilerFailed, InductorError, Unsupported, ...
            reason = " ".join(line.strip() for line in str(error).splitlines()[:2] if line.strip())
            warnings.warn(f"torch.compile of the MedITok {name} failed ({type(error).__name__}: {reason}); running "
                          f"it eagerly instead", RuntimeWarning, stacklevel=2)
            module.forward = eager_forward
            return eager_forward(*args, **kwargs)

    module.forward = forward  # an instance attribute: parameter names and state dict are unchanged


def compile_regions(model: "MedITok") -> Dict[str, nn.Module]:
    """The repeated units regional compilation compiles one by one, by name: the encoder's stem, each MbConv
    block and the strided pool, each ViT block of encoder and decoder, and each decoder upsampling stage.
    Blocks of one kind share their code and, at equal shapes, their compiled graph (dynamo inlines module
    parameters as graph inputs), so a 24-block ViT compiles one block graph, not 24."""
    backbone = model.encoder.patch_embed.backbone
    regions: Dict[str, nn.Module] = {"encoder.stem": backbone.stem}
    for s, stage in enumerate(backbone.stages):
        regions.update({f"encoder.stages.{s}.{i}": block for i, block in enumerate(stage)})
    regions["encoder.pool"] = backbone.pool
    regions.update({f"encoder.blocks.{i}": b for i, b in enumerate(model.encoder.blocks)})
    regions.update({f"decoder.blocks.{i}": b for i, b in enumerate(model.decoder.blocks)})
    regions.update({f"decoder.conv_stages.{i}": st for i, st in enumerate(model.decoder.conv_stages())})
    return regions


class GraphedCall:
    """A token-API method replayed from CUDA graphs, one captured per static input signature.

    ``GraphedCall(fn)(x)`` equals ``fn(x)``. On a CUDA tensor with gradients off (``torch.inference_mode`` /
    ``no_grad``), the first call with a new (shape, dtype, strides, autocast) signature warms ``fn`` up on a
    side stream and captures it into a ``torch.cuda.CUDAGraph``; later calls copy ``x`` into the captured
    input buffer, replay the graph (one launch for the hundreds of kernels of a forward pass, no per-kernel
    CPU overhead) and return a copy of the captured output. Everything else (CPU tensors, gradients on) calls
    ``fn`` directly, and so does every call after a capture failed (with one warning). Each captured signature
    keeps its input/output buffers and its intermediates' memory pool alive (shared between signatures).
    """

    def __init__(self, fn, name: str, validate=None):
        self.fn, self.name, self.validate = fn, name, validate
        self.graphs: Dict[tuple, tuple] = {}
        self.failed = False
        self.pool = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or self.failed or torch.is_grad_enabled():
            return self.fn(x)
        if self.validate is not None:
            self.validate(x)  # user errors surface as errors, not as a capture failure
        key = (tuple(x.shape), x.dtype, x.stride(), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
               torch.is_inference_mode_enabled())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(x)
            except RuntimeError as error:
                warnings.warn(f"CUDA-graph capture of MedITok.{self.name} failed ({str(error).splitlines()[0]}); "
                              f"running it eagerly instead", RuntimeWarning, stacklevel=2)
                self.failed = True
                return self.fn(x)
        static_in, static_out, graph = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN/cuBLAS heuristics, lazy allocations
            for _ in range(2):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        return static_in, static_out, graph


class MedITok(nn.Module):
    """Unified visual tokenizer for medical images (see module docstring for the token API)."""

    def __init__(self, config: MedITokConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = ViTaminEncoder(c.stem_width, c.conv_widths, c.conv_depths, c.vit_width, c.vit_depth,
                                      c.vit_heads, c.mlp_ratio, c.drop_path)
        self.quant_proj = AttentionProjection(c.vit_width, c.vocab_width, c.proj_heads)
        self.quantizer = MultiCodebookQuantizer(c.num_codebooks, c.codebook_size, c.codebook_dim, c.vq_beta)
        self.post_quant_proj = AttentionProjection(c.vocab_width, c.vit_width, c.proj_heads)
        self.decoder = ViTaminDecoder(c.conv_widths, c.decoder_conv_depths, c.vit_width, c.decoder_vit_depth,
                                      c.vit_heads, c.mlp_ratio, c.drop_path)
        # Alignment head: mean-pooled post-quantisation tokens → LayerNorm → 768-d (docs/method.md §1).
        self.fc_norm = nn.LayerNorm(c.vit_width, eps=1e-6)
        self.projection = nn.Linear(c.vit_width, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # ----------------------------------------------------------------------------------------------
    # Construction helpers
    @torch.no_grad()
    def init_weights(self, include_encoder: bool = True) -> "MedITok":
        """Initialise every tensor for training from scratch, as the released training did (docs/method.md §2):
        linear weights truncated-normal std 0.02, convolutions xavier-normal gain 0.5, norms 1/0, biases 0,
        codebooks uniform ±D^-0.5/36, logit scale log(1/0.07), fixed zero tensors zero. Works on a model
        materialised with ``to_empty``. The released run initialised the encoder from UniTok instead; pass
        ``include_encoder=False`` to leave the encoder's weights as they are."""
        parts = [self.decoder, self.quant_proj, self.post_quant_proj, self.projection, self.fc_norm]
        if include_encoder:
            parts.append(self.encoder)
            self.encoder.pos_embed.zero_()
        for part in parts:
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Conv2d):
                    nn.init.xavier_normal_(m.weight, gain=0.5)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        for attn in (self.quant_proj.attn, self.post_quant_proj.attn):
            attn.q_bias.zero_()
            attn.v_bias.zero_()
            attn.zero_k_bias.zero_()
        self.quantizer.reset_parameters()
        self.quantizer.vocab_usage.zero_()
        self.logit_scale.fill_(math.log(1 / 0.07))
        return self

    #: what ``set_grad_checkpointing(parts=...)`` can recompute in the backward pass
    CHECKPOINT_PARTS = ("all", "vit", "decoder_conv", "vit_selective", "vit_selective+decoder_conv")

    def set_grad_checkpointing(self, enable: bool = True, parts: str = "all") -> None:
        """Recompute activations in the backward pass to save memory: ``parts="vit"`` the ViT blocks of encoder
        and decoder, ``"decoder_conv"`` the decoder's upsampling stages, ``"all"`` both (whole units: only their
        input is stored). ``"vit_selective"`` checkpoints the ViT blocks selectively: the outputs of their
        matmuls and fused attention are stored, the cheap memory-bound ops between them (LayerNorm, GELU, the
        GeGLU product, residual adds) are recomputed, so the backward pass repeats no matmul;
        ``"vit_selective+decoder_conv"`` adds whole-stage checkpointing of the decoder's upsampling stages.
        Gradients are unchanged. How much memory each setting frees, and whether a batch of 64 then fits a GPU,
        is printed by ``python -m meditok.info large --activations`` (figures in docs/performance.md)."""
        if parts not in self.CHECKPOINT_PARTS:
            raise ValueError(f"grad-checkpointing parts {parts!r}: use one of {self.CHECKPOINT_PARTS}")
        vit = {"all": True, "vit": True}.get(parts, "selective" if parts.startswith("vit_selective") else False)
        conv = parts in ("all", "decoder_conv", "vit_selective+decoder_conv")
        self.encoder.grad_checkpointing = vit if enable else False
        self.decoder.grad_checkpointing = vit if enable else False
        self.decoder.grad_checkpointing_convs = conv and enable

    #: forms of ``speed_up(compile=...)``: True/"whole" = encoder and decoder each as one graph (the original
    #: option), "regional" = each repeated block on its own (``compile_regions``)
    COMPILE_FORMS = ("whole", "regional")
    UPSAMPLE_FORMS = ("transposed", "direct")

    def speed_up(self, channels_last: bool = False, compile=False, backend: str = "inductor",
                 mode: Optional[str] = None, upsample: Optional[str] = None, fused_norm: bool = False,
                 cuda_graphs: bool = False, score_chunk: Optional[int] = None) -> "MedITok":
        """Run-time options for speed that change neither the parameters' names nor the results (beyond float
        rounding); in place, returns the model. Every option off (the defaults) leaves the model as built.

        ``channels_last``: the encoder and decoder convolutions keep their weights and activations in NHWC
        layout (cuDNN's fast path for bf16 convolutions, and LayerNorm2d's permutes become free); the decoder
        already receives NHWC-strided maps from its token reshape.

        ``compile``: ``True`` or ``"whole"``: ``torch.compile`` of the encoder and the decoder, each one graph
        per input shape. ``"regional"``: each repeated unit compiled on its own (``compile_regions``: stem,
        MbConv blocks, ViT blocks, decoder upsampling stages): identical blocks reuse one compiled graph, so
        compilation takes a fraction of the whole-model time, and batch sizes after the first compile one
        dynamic-batch graph (``dynamic=None``) instead of one graph each. Compiled with ``backend`` (a name or a
        backend callable) and ``mode``; the quantizer and projections stay eager, fp32. A unit whose forward
        graph fails to compile warns once and runs eagerly from then on; dynamo's global settings are left as
        they are.

        ``upsample``: ``"transposed"`` (the built default: the 3×3 conv of each ×2 upsampling run as a stride-2
        4×4 transposed conv over the small map, 16/36 of the FLOPs) or ``"direct"`` (nearest ×2 then the 3×3
        conv; same parameters and, in exact arithmetic, the same result; a plain convolution may meet a faster
        cuDNN engine).

        ``fused_norm``: LayerNorm2d (+GELU) of the conv stages as one Triton kernel over channels-last maps at
        inference (``meditok.kernels.layernorm2d``; needs ``channels_last`` and CUDA, eager otherwise).

        ``cuda_graphs``: ``img_to_idx`` and ``img_to_reconstructed_img`` (and their aliases) replay CUDA graphs
        captured per static input shape (``GraphedCall``); CPU inputs and calls with gradients run eagerly.

        ``score_chunk``: the quantizer scores this many tokens at a time (ids unchanged, less peak memory).
        """
        if compile not in (False, True) + self.COMPILE_FORMS:
            raise ValueError(f"compile={compile!r}: use False, True (= 'whole') or one of {self.COMPILE_FORMS}")
        if upsample is not None and upsample not in self.UPSAMPLE_FORMS:
            raise ValueError(f"upsample={upsample!r}: use one of {self.UPSAMPLE_FORMS}")
        if channels_last:
            for part in (self.encoder, self.decoder):
                part.to(memory_format=torch.channels_last)
            self.encoder.channels_last = True
        if upsample is not None:
            from .vitamin import Upsample2d
            for m in self.decoder.modules():
                if isinstance(m, Upsample2d):
                    m.direct = upsample == "direct"
        if fused_norm:
            from .kernels.layernorm2d import install
            install(self.encoder)
            install(self.decoder)
        if score_chunk is not None:
            self.quantizer.score_chunk = int(score_chunk)
        if compile in (True, "whole"):
            for name in ("encoder", "decoder"):
                _compile_with_eager_fallback(getattr(self, name), name, backend=backend, mode=mode)
        elif compile == "regional":
            for name, region in compile_regions(self).items():
                _compile_with_eager_fallback(region, name, dynamic=None, backend=backend, mode=mode)
        if cuda_graphs:
            for name in ("img_to_idx", "img_to_reconstructed_img"):
                graphed = GraphedCall(getattr(self, name), name, validate=self._check_image)
                setattr(self, name, graphed)
            # the class-level aliases point at the class's functions: bind them to the graphed calls too
            self.tokenize, self.reconstruct = self.img_to_idx, self.img_to_reconstructed_img
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ----------------------------------------------------------------------------------------------
    # Pieces
    def _check_image(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"image height and width must be multiples of 16, got {tuple(x.shape[-2:])}")

    def encode_latent(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """[B, 3, H, W] in [-1, 1] → continuous pre-quantisation latent [B, L, 64] (float32), token grid (h, w)."""
        self._check_image(x)
        tokens, grid = self.encoder(x, return_grid=True)
        with autocast_off(tokens):
            return self.quant_proj(tokens.float()), grid

    def decode_latent(self, z_q: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Quantized latent [B, L, 64] → raw decoder output [B, 3, 16h, 16w] (not clamped)."""
        return self.decoder(self._post_quant(z_q), grid)

    def _post_quant(self, z_q: torch.Tensor) -> torch.Tensor:
        with autocast_off(z_q):
            return self.post_quant_proj(z_q.float())

    def _align(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self.fc_norm(tokens.mean(dim=1)))

    def logit_scale_exp(self) -> torch.Tensor:
        """exp(logit_scale), with the scale clamped at log(100) as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    # ----------------------------------------------------------------------------------------------
    # Training pass
    def forward(self, x: torch.Tensor, decode_batch: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Training pass. x [B, 3, H, W] in [-1, 1].

        Returns a dict: ``reconstruction`` [b, 3, H, W] (float32, unclamped; b = decode_batch or B),
        ``vq_loss`` (scalar), ``codebook_usage`` (scalar, % of codes used in this batch), ``ids``
        [B, 8, L], ``image_features`` [B, 768] ℓ2-normalised, ``logit_scale`` (scalar, exp'd, clamped).
        """
        z, grid = self.encode_latent(x)
        with autocast_off(z):
            q: QuantizerOutput = self.quantizer(z)
            tokens = self.post_quant_proj(q.quantized)
        keep = tokens if decode_batch is None else tokens[:decode_batch]
        reconstruction = self.decoder(keep, grid).float()
        return {
            "reconstruction": reconstruction,
            "vq_loss": q.loss,
            "codebook_usage": q.usage,
            "ids": q.ids,
            "image_features": F.normalize(self._align(tokens), dim=-1),
            "logit_scale": self.logit_scale_exp(),
        }

    # ----------------------------------------------------------------------------------------------
    # Token API (released names)
    def img_to_idx(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → token ids [B, 8, (H/16)·(W/16)], int64, each in [0, 4096)."""
        z, _ = self.encode_latent(x)
        return self.quantizer.f_to_idx(z)

    def idx_to_img(self, ids: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Token ids [B, 8, L] (square grid) or [B, 8, h, w] → images [B, 3, 16h, 16w] in [-1, 1]."""
        if grid is None and ids.dim() == 4:
            grid = (ids.shape[-2], ids.shape[-1])
        z_q = self.quantizer.idx_to_f(ids.to(self.device))
        return self.decode_latent(z_q, grid).float().clamp(-1, 1)

    def img_to_reconstructed_img(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → reconstruction [B, 3, H, W] in [-1, 1] (encode, quantize, decode)."""
        z, grid = self.encode_latent(x)
        with autocast_off(z):
            _, z_q = self.quantizer.quantize(z)
        return self.decode_latent(z_q, grid).float().clamp(-1, 1)

    def encode_image_vq(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → quantized latent [B, L, 64], float32 (each 8-d chunk a unit codeword)."""
        z, _ = self.encode_latent(x)
        return self.quantizer.quantize(z)[1]

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] → alignment embedding [B, 768] (the space trained against the teachers);
        ℓ2-normalised when ``normalize``."""
        tokens = self._post_quant(self.encode_image_vq(x))
        features = self._align(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → mean-pooled encoder tokens [B, vit_width] (pre-quantisation), for probing."""
        self._check_image(x)
        return self.encoder(x).mean(dim=1)

    # Clearer aliases
    tokenize = img_to_idx
    detokenize = idx_to_img
    reconstruct = img_to_reconstructed_img

    def token_grid(self, img_size: Optional[int] = None) -> Tuple[int, int]:
        return self.config.token_grid(img_size)
