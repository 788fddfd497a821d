"""Every speed variant of MedITok.speed_up / set_grad_checkpointing computes what the eager, built model computes.

Each test builds two copies of one tiny model (same seed, same weights), applies one variant to one of them and
compares outputs (ids exactly; maps within float tolerance) or gradients (float64) on the same inputs.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import meditok
from meditok.model import GraphedCall, compile_regions
from meditok.vitamin import Upsample2d

ROOT = Path(__file__).resolve().parents[1]


def _pair(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    a = meditok.build_meditok("tiny", **overrides).eval().to(dtype)
    b = meditok.build_meditok("tiny", **overrides).eval().to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def _images(n=2, size=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def test_regional_compile_equals_eager_and_compiles_every_repeated_block():
    eager, compiled = _pair()
    keys = list(compiled.state_dict())
    compiled.speed_up(compile="regional", backend="eager")  # dynamo's graph capture, no code generation
    regions = compile_regions(compiled)
    # every ViT block, every MbConv block and every decoder stage is its own compiled unit
    cfg = compiled.config
    assert sum(n.startswith("encoder.blocks.") for n in regions) == cfg.vit_depth
    assert sum(n.startswith("decoder.blocks.") for n in regions) == cfg.decoder_vit_depth
    assert sum(n.startswith("encoder.stages.") for n in regions) == sum(cfg.conv_depths)
    assert sum(n.startswith("decoder.conv_stages.") for n in regions) == 2 + sum(cfg.decoder_conv_depths)
    assert all("forward" in vars(m) for m in regions.values())  # compiled in place, as instance attributes
    assert "forward" not in vars(compiled.encoder)  # the whole encoder is not one graph
    assert list(compiled.state_dict()) == keys
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(compiled.img_to_reconstructed_img(x), eager.img_to_reconstructed_img(x))
        assert torch.equal(compiled.img_to_idx(x), eager.img_to_idx(x))


def test_unknown_speed_options_are_refused():
    model, _ = _pair()
    with pytest.raises(ValueError, match="compile='graphs'"):
        model.speed_up(compile="graphs")
    with pytest.raises(ValueError, match="upsample='bilinear'"):
        model.speed_up(upsample="bilinear")


def test_direct_and_transposed_upsampling_are_equal_in_float64():
    transposed, direct = _pair(torch.float64)
    keys = list(direct.state_dict())
    direct.speed_up(upsample="direct")
    ups = [m for m in direct.modules() if isinstance(m, Upsample2d)]
    assert ups and all(m.direct for m in ups)
    assert list(direct.state_dict()) == keys
    tokens = torch.randn(2, 4, direct.config.vit_width, dtype=torch.float64)  # a 2×2 token grid
    with torch.no_grad():
        a, b = transposed.decoder(tokens), direct.decoder(tokens)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the independent reference: nearest ×2 then the 3×3 conv, written here
    up = transposed.decoder.up_conv1
    feat = torch.randn(1, up.conv.in_channels, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(up(feat), up.conv(F.interpolate(feat, scale_factor=2.0, mode="nearest")),
                               rtol=1e-10, atol=1e-10)


def test_quantizer_scores_in_chunks_give_identical_ids():
    model, _ = _pair()
    q = model.quantizer
    z = torch.randn(3, 50, q.num_codebooks * q.codebook_dim)
    whole = q.f_to_idx(z)
    q.score_chunk = 7  # does not divide 150 tokens: the last piece is short
    assert torch.equal(q.f_to_idx(z), whole)
    ids, latent = q.quantize(z)
    assert torch.equal(ids, whole) and torch.equal(latent, q.idx_to_f(whole))
    # reference written here: per-codebook cosine argmax
    chunks = F.normalize(z.reshape(-1, q.num_codebooks, q.codebook_dim), dim=-1)
    books = F.normalize(q.weight, dim=-1)
    ref = torch.stack([(chunks[:, k] @ books[k].T).argmax(-1) for k in range(q.num_codebooks)]).reshape(
        q.num_codebooks, 3, 50).transpose(0, 1)
    assert torch.equal(whole, ref)


def test_cuda_graphs_option_runs_eagerly_on_cpu():
    eager, graphed = _pair()
    graphed.speed_up(cuda_graphs=True, score_chunk=16)
    assert isinstance(graphed.img_to_idx, GraphedCall) and graphed.tokenize is graphed.img_to_idx
    x = _images()
    with torch.inference_mode():
        assert torch.equal(graphed.tokenize(x), eager.img_to_idx(x))
        torch.testing.assert_close(graphed.reconstruct(x), eager.img_to_reconstructed_img(x))
    assert graphed.img_to_idx.graphs == {} and not graphed.img_to_idx.failed
    with pytest.raises(ValueError, match="multiples of 16"):
        graphed.img_to_idx(_images(size=24))


def test_selective_checkpointing_gives_the_plain_gradients_in_float64():
    plain, ckpt = _pair(torch.float64)
    plain.train(), ckpt.train()
    ckpt.set_grad_checkpointing(True, "vit_selective+decoder_conv")
    assert ckpt.encoder.grad_checkpointing == ckpt.decoder.grad_checkpointing == "selective"
    assert ckpt.decoder.grad_checkpointing_convs is True
    ckpt.set_grad_checkpointing(True, "vit_selective")
    assert ckpt.decoder.grad_checkpointing == "selective" and ckpt.decoder.grad_checkpointing_convs is False
    x = _images(n=1, dtype=torch.float64)
    for model in (plain, ckpt):  # encoder → decoder in float64 (the fp32 bottleneck left out)
        torch.manual_seed(5)
        tokens, grid = model.encoder(x, return_grid=True)
        model.decoder(tokens, grid).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_selective_checkpointing_stores_less_and_the_budget_lines_add_up():
    from meditok import info
    mib = info.activations_per_checkpointing("tiny", 32)
    assert mib["vit"] < mib["vit_selective"] < mib["none"]
    assert mib["all"] < mib["vit_selective+decoder_conv"] < mib["decoder_conv"]
    params = sum(p.numel() for p in meditok.build_meditok("tiny", empty=True).parameters())
    row = {"preset": "tiny", "img_size": 32, "parameters": {"total": params}, "activation_mib_per_image_fp32": mib}
    text = info.memory_budget_lines(row, batch=64, gpu_gb=80)
    # independent arithmetic: 16 B per parameter + bf16 share of the fp32 activations × 64 + the calibrated rest
    total = 16 * params / 1e9 + mib["vit_selective"] * 2 ** 20 * info.BF16_ACTIVATION_FRACTION * 64 / 1e9 \
        + info.LOSS_NETWORKS_AND_SLACK_GB
    line = next(l for l in text.splitlines() if l.strip().startswith("vit_selective:"))
    assert f"= {total:.1f} GB -> fits 80 GB at batch 64" in line
    assert "does NOT fit 1 GB" in info.memory_budget_lines(row, batch=64, gpu_gb=1)


FUSED_NORM_CHECK = textwrap.dedent("""
    import torch
    from timm.layers import LayerNorm2d, LayerNormAct2d
    import meditok
    from meditok.kernels import layernorm2d as k
    torch.manual_seed(0)
    for m in (LayerNorm2d(40, eps=1e-6), LayerNormAct2d(24, eps=1e-6, act_layer="gelu")):
        with torch.no_grad():
            m.weight.normal_(); m.bias.normal_()
            x = torch.randn(2, m.weight.numel(), 5, 3).contiguous(memory_format=torch.channels_last)
            # independent reference: normalise each pixel's channel vector, then exact GELU
            v = x.permute(0, 2, 3, 1)
            ref = (v - v.mean(-1, keepdim=True)) / (v.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
            ref = (ref * m.weight + m.bias).permute(0, 3, 1, 2)
            if isinstance(m, LayerNormAct2d):
                ref = 0.5 * ref * (1 + torch.erf(ref / 2 ** 0.5))
            y = k.layer_norm_2d(x, m.weight, m.bias, 1e-6, gelu=isinstance(m, LayerNormAct2d))
            assert y.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    eager = meditok.build_meditok("tiny").eval()
    fused = meditok.build_meditok("tiny").eval()
    fused.load_state_dict(eager.state_dict())
    fused.speed_up(channels_last=True, fused_norm=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fused.img_to_reconstructed_img(x), eager.img_to_reconstructed_img(x),
                                   rtol=1e-4, atol=1e-4)
    from timm.layers import LayerNorm2d, LayerNormAct2d
    norms = [m for m in fused.modules() if isinstance(m, (LayerNorm2d, LayerNormAct2d))]
    assert norms and all(getattr(m, "_fused_norm", False) for m in norms), [type(m) for m in norms]
    print("routed", k.install(fused))
""")


def test_triton_layernorm2d_kernel_in_the_cpu_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", FUSED_NORM_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "routed 0" in done.stdout  # already routed once by speed_up: not wrapped twice


def test_train_flags_choose_the_upsampling_and_compile_forms():
    """train.py --upsample / --compile-form reach MedITok.speed_up through the trainer; bad values are refused."""
    from meditok.vitamin import Upsample2d
    from tokenizer_training.args import Args, parse_args
    from tokenizer_training.trainer import Trainer

    common = dict(preset="tiny", img_size=32, device="cpu", precision="fp32", lpips_weight=0, adv_weight=0,
                  contrast_weight=0)
    forms = []
    for options in ({}, {"upsample": "direct"}, {"upsample": "transposed"}):
        tokenizer = Trainer(Args(**common, **options), torch.device("cpu")).tokenizer
        forms.append({m.direct for m in tokenizer.decoder.modules() if isinstance(m, Upsample2d)})
    assert forms == [{False}, {True}, {False}]  # as built = transposed

    trainer = Trainer(Args(**common, compile=True, compile_form="regional", compile_backend="eager"),
                      torch.device("cpu"))
    regions = compile_regions(trainer.tokenizer)
    assert regions and all("forward" in vars(m) for m in regions.values())
    assert "forward" not in vars(trainer.tokenizer.encoder)  # regional, not whole
    assert "forward" in vars(Trainer(Args(**common, compile=True, compile_backend="eager"),
                                     torch.device("cpu")).tokenizer.encoder)  # the default form: whole
    for flag, value in (("--upsample", "bilinear"), ("--compile-form", "partial")):
        with pytest.raises(SystemExit):
            parse_args([flag, value])
