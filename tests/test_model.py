"""The tokenizer: presets, shapes of every API call, consistency of the token paths, and the
architecture checked piece by piece against independent references (timm's own ViTamin, explicit
attention)."""
import json
import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import meditok
from meditok.config import PRESETS, MedITokConfig
from meditok.projection import CausalAttention
from meditok.vitamin import InvMbConvBlock, InvStem, Upsample2d


# --------------------------------------------------------------------------------------------------
# Presets

@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_and_its_config_round_trips(preset):
    cfg = meditok.get_config(preset)
    assert MedITokConfig.from_json(cfg.to_json()) == cfg
    model = meditok.build_meditok(preset, empty=True)  # meta device: no memory
    n = sum(p.numel() for p in model.parameters())
    assert n > 0 and model.config.preset == preset
    assert model.config.vocab_size == 8 * 4096 and model.config.codebook_dim == 8


def test_preset_sizes_follow_spec():
    large = meditok.get_config("large")
    assert (large.conv_widths, large.conv_depths, large.stem_width) == ((160, 320), (2, 4), 160)
    assert (large.vit_width, large.vit_depth, large.vit_heads) == (1024, 31, 16)
    base, small = meditok.get_config("base"), meditok.get_config("small")
    assert (base.conv_widths, base.vit_width, base.vit_depth, base.vit_heads) == ((128, 256), 768, 14, 12)
    assert (small.conv_widths, small.vit_width, small.vit_depth, small.vit_heads) == ((64, 128), 384, 14, 6)


def test_config_overrides_and_errors(tmp_path):
    cfg = meditok.get_config("tiny", img_size=64)
    assert cfg.img_size == 64 and cfg.token_grid() == (4, 4)
    cfg.to_json(tmp_path / "c.json")
    assert MedITokConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="Unknown MedITok preset 'huge'"):
        meditok.get_config("huge")
    with pytest.raises(TypeError, match="Unknown override"):
        meditok.get_config("tiny", widht=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        meditok.get_config("tiny", img_size=100)


def test_old_configs_with_the_retired_expand_ratio_still_load(tmp_path):
    """config.json files written before conv_expand_ratio was dropped carry it; it never changed the model."""
    old = {**meditok.get_config("tiny").to_dict(), "conv_expand_ratio": 4.0}
    assert MedITokConfig.from_dict(old) == meditok.get_config("tiny")
    assert "conv_expand_ratio" not in meditok.get_config("tiny").to_dict()
    with pytest.raises(ValueError, match="Unknown MedITokConfig field"):
        MedITokConfig.from_dict({**old, "conv_expand_ration": 4.0})
    # A model saved with such a config.json loads back with its weights.
    torch.manual_seed(0)
    model = meditok.build_meditok("tiny")
    folder = meditok.save_meditok(model, tmp_path / "old_tok")
    config_file = tmp_path / "old_tok" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "conv_expand_ratio": 4.0}))
    loaded = meditok.load_meditok(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# --------------------------------------------------------------------------------------------------
# Token API

def test_shapes_and_dtypes_of_every_api_call(tiny_model, images):
    m = tiny_model
    B = images.shape[0]
    with torch.no_grad():
        ids = m.img_to_idx(images)
        assert ids.shape == (B, 8, 16) and ids.dtype == torch.int64
        assert int(ids.min()) >= 0 and int(ids.max()) < 4096
        rec = m.idx_to_img(ids)
        assert rec.shape == images.shape and rec.dtype == torch.float32
        assert rec.min() >= -1 and rec.max() <= 1
        rec2 = m.img_to_reconstructed_img(images)
        assert rec2.shape == images.shape and rec2.dtype == torch.float32
        emb = m.encode_image(images)
        assert emb.shape == (B, 768) and emb.dtype == torch.float32
        emb_n = m.encode_image(images, normalize=True)
        torch.testing.assert_close(emb_n.norm(dim=-1), torch.ones(B))
        torch.testing.assert_close(emb_n, F.normalize(emb, dim=-1))
        feats = m.forward_features(images)
        assert feats.shape == (B, m.config.vit_width)
        zq = m.encode_image_vq(images)
        assert zq.shape == (B, 16, 64) and zq.dtype == torch.float32
        out = m(images)
    assert out["reconstruction"].shape == images.shape
    assert out["ids"].shape == (B, 8, 16)
    assert out["image_features"].shape == (B, 768)
    for k in ("vq_loss", "codebook_usage", "logit_scale"):
        assert out[k].shape == () and torch.isfinite(out[k])
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert m.tokenize == m.img_to_idx and m.reconstruct == m.img_to_reconstructed_img


def test_token_paths_agree(tiny_model, images):
    """idx → img equals direct reconstruction; the training pass, tokenization and the quantized
    latent all see the same ids."""
    m = tiny_model
    with torch.no_grad():
        ids = m.img_to_idx(images)
        torch.testing.assert_close(m.idx_to_img(ids), m.img_to_reconstructed_img(images), rtol=0, atol=0)
        out = m(images)
        assert torch.equal(out["ids"], ids)
        torch.testing.assert_close(out["reconstruction"].clamp(-1, 1), m.img_to_reconstructed_img(images))
        torch.testing.assert_close(m.encode_image_vq(images), m.quantizer.idx_to_f(ids))
        # decoding is deterministic and ids → img → ids is a fixed point of the encode path on the decoded image
        again = m.img_to_idx(m.idx_to_img(ids))
        assert again.shape == ids.shape
        assert torch.equal(m.img_to_idx(m.idx_to_img(ids)), again)


def test_non_square_images_and_grids(tiny_model):
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        ids = tiny_model.img_to_idx(x)
        assert ids.shape == (1, 8, 4 * 6)
        rec = tiny_model.idx_to_img(ids.reshape(1, 8, 4, 6))
        assert rec.shape == (1, 3, 64, 96)
        torch.testing.assert_close(rec, tiny_model.img_to_reconstructed_img(x))
        with pytest.raises(ValueError, match="grid"):
            tiny_model.idx_to_img(ids)  # 24 tokens: not a square, grid needed


def test_bad_inputs_give_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model.img_to_idx(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_model.img_to_idx(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        tiny_model.idx_to_img(torch.full((1, 8, 16), 5000))


def test_gradients_reach_the_encoder_through_the_straight_through_estimator(tiny_model, images):
    m = tiny_model.train()
    out = m(images)
    # a loss on the reconstruction alone: the only path back to the encoder crosses the quantizer
    out["reconstruction"].square().mean().backward()
    enc_grads = [p.grad for p in m.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in enc_grads)
    assert sum(float(g.abs().sum()) for g in enc_grads) > 0
    assert m.quantizer.weight.grad is None or float(m.quantizer.weight.grad.abs().sum()) == 0


@pytest.mark.parametrize("parts", ["all", "vit", "decoder_conv"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(images, parts):
    from meditok.info import saved_activation_bytes

    def run(ckpt):
        torch.manual_seed(0)
        m = meditok.build_meditok("tiny").train()
        m.set_grad_checkpointing(ckpt, parts)
        kept = saved_activation_bytes(m, images)
        out = m(images)
        (out["reconstruction"].abs().mean() + out["vq_loss"]).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, kept
    (a, kept_plain), (b, kept_ckpt) = run(False), run(True)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n)
    assert kept_ckpt < kept_plain  # it really recomputes instead of keeping
    with pytest.raises(ValueError, match="decoder_conv"):
        meditok.build_meditok("tiny").set_grad_checkpointing(True, "encoder")


def test_each_checkpointing_setting_saves_its_share_for_large():
    """On the released architecture (meta device, no compute): each setting keeps clearly less than none, and
    'all' less than either part alone."""
    from meditok.info import activations_per_checkpointing
    a = activations_per_checkpointing("large", 256)
    assert a["all"] < min(a["vit"], a["decoder_conv"]) and max(a["vit"], a["decoder_conv"]) < 0.75 * a["none"]


def test_saved_activation_bytes_counts_what_backward_keeps():
    """Against a hand count: y = relu(x @ w) keeps x (for w's gradient) and relu's output — not w itself."""
    from meditok.info import saved_activation_bytes

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 5))

        def forward(self, x):
            return torch.relu(x @ self.w)
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_activation_bytes(Tiny(), x) == 4 * 8 * 4 + 4 * 5 * 4


def test_bottleneck_stays_float32_under_bf16_autocast(tiny_model, images):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = tiny_model.encode_latent(images)
        out = tiny_model(images)
    assert z.dtype == torch.float32
    assert out["reconstruction"].dtype == torch.float32
    assert out["vq_loss"].dtype == torch.float32


def test_init_weights_follows_spec():
    torch.manual_seed(0)
    m = meditok.build_meditok("tiny")
    bound = 8 ** -0.5 / 36
    assert float(m.quantizer.weight.detach().abs().max()) <= bound
    assert float(m.encoder.pos_embed.detach().abs().max()) == 0
    lin = m.decoder.blocks[0].attn.qkv.weight.detach()
    assert abs(float(lin.std()) - 0.02) < 0.003  # truncated normal, std 0.02 (truncation at ±2 barely matters)
    conv = m.decoder.up_conv4.conv2.weight.detach()  # xavier normal, gain 0.5
    fan_in, fan_out = conv.shape[1] * 9, conv.shape[0] * 9
    expected = 0.5 * math.sqrt(2.0 / (fan_in + fan_out))
    assert abs(float(conv.std()) - expected) / expected < 0.1
    assert torch.equal(m.decoder.norm.weight, torch.ones_like(m.decoder.norm.weight))


# --------------------------------------------------------------------------------------------------
# Architecture against independent references

def test_encoder_equals_timms_vitamin_with_our_weights(tiny_model):
    """Build the released architecture the way the released code did — a timm VisionTransformer with a
    ViTamin MbConv backbone, GeGLU MLPs, no class token, no positional embedding — load our encoder's
    weights into it by name, and compare outputs."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vitamin import GeGluMlp, HybridEmbed, MbConvStages, VitCfg, VitConvCfg

    c = tiny_model.config
    backbone = MbConvStages(VitCfg(embed_dim=(*c.conv_widths, c.vit_width), depths=(*c.conv_depths, 1),
                                   stem_width=c.stem_width,
                                   conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6)))
    ref = VisionTransformer(
        img_size=64, patch_size=1, embed_dim=c.vit_width, depth=c.vit_depth, num_heads=c.vit_heads, mlp_ratio=2.0,
        class_token=False, global_pool="", num_classes=0, pos_embed="none", fc_norm=False,
        mlp_layer=GeGluMlp, act_layer="gelu_tanh", embed_layer=partial(HybridEmbed, backbone=backbone, proj=False),
    ).eval()
    ours = tiny_model.encoder.state_dict()
    assert float(ours.pop("pos_embed").abs().max()) == 0
    ref.load_state_dict(ours, strict=True)  # same names, same shapes
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.encoder(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)


def explicit_causal_attention(x, attn):
    """Reference: per-head softmax(q kᵀ / √d + causal mask) v, heads averaged (down) or concatenated (up)."""
    B, N, _ = x.shape
    W = attn.qkv.weight
    inner = W.shape[0] // 3
    q = x @ W[:inner].T + attn.q_bias
    k = x @ W[inner:2 * inner].T
    v = x @ W[2 * inner:].T + attn.v_bias
    heads = []
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    for h in range(attn.num_heads):
        s = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        scores = (q[..., s] @ k[..., s].transpose(1, 2)) / math.sqrt(attn.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., s])
    y = torch.stack(heads).mean(0) if attn.in_dim > attn.out_dim else torch.cat(heads, dim=-1)
    return attn.proj(y)


@pytest.mark.parametrize("in_dim,out_dim", [(128, 64), (64, 128)])
def test_causal_attention_matches_explicit_reference(in_dim, out_dim):
    torch.manual_seed(0)
    attn = CausalAttention(in_dim, out_dim, num_heads=2)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 7, in_dim)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), explicit_causal_attention(x, attn), rtol=1e-5, atol=1e-5)
    # causal: changing the last token leaves earlier outputs untouched
    x2 = x.clone()
    x2[:, -1] += 1
    with torch.no_grad():
        torch.testing.assert_close(attn(x2)[:, :-1], attn(x)[:, :-1])


def test_decoder_conv_blocks_match_functional_reference():
    """Inverse MbConv (upsampling) and inverse stem against an explicit composition of torch ops."""
    torch.manual_seed(0)
    block, stem = InvMbConvBlock(16, 8, upsample=True), InvStem(8, 3)
    for m in (block, stem):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, 5, 6)

    def ln2d(t, norm):
        return F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2], norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)

    def up(t, conv):
        return F.conv2d(F.interpolate(t, scale_factor=2, mode="nearest"), conv.conv.weight, conv.conv.bias, padding=1)

    h = F.gelu(F.conv2d(ln2d(x, block.pre_norm), block.conv1_1x1.weight, block.conv1_1x1.bias))
    h = up(h, block.up)
    h = F.gelu(F.conv2d(h, block.conv2_kxk.weight, block.conv2_kxk.bias, padding=1, groups=h.shape[1]))
    expected = F.conv2d(h, block.conv3_1x1.weight, block.conv3_1x1.bias) + up(x, block.shortcut)
    with torch.no_grad():
        got = block(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert got.shape == (2, 8, 10, 12)
        s = F.conv2d(F.gelu(ln2d(up(got, stem.conv1), stem.norm1)), stem.conv2.weight, stem.conv2.bias, padding=1)
        torch.testing.assert_close(stem(got), s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 16, 1, 1), (3, 8, 6, 5)])
def test_upsampling_conv_equals_nearest_upsample_then_3x3_conv(shape):
    """The transposed-conv form of Upsample2d against the textbook nearest ×2 + 3×3 conv, values and gradients
    (float64, so that only the order of additions differs), on odd, non-square and 1×1 maps."""
    torch.manual_seed(0)
    b, c_in, h, w = shape
    up = Upsample2d(c_in, 7).double()
    x = torch.randn(b, c_in, h, w, dtype=torch.float64, requires_grad=True)
    reference = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    got = up(x)
    assert got.shape == (b, 7, 2 * h, 2 * w)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)
    weights = torch.randn_like(reference)
    for g, r in zip(torch.autograd.grad((got * weights).sum(), (x, up.conv.weight, up.conv.bias)),
                    torch.autograd.grad((reference * weights).sum(), (x, up.conv.weight, up.conv.bias))):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    with torch.no_grad():  # the direct form stays available, and the state dict is the plain conv's
        torch.testing.assert_close(up(x, direct=True), reference)
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}


# --------------------------------------------------------------------------------------------------
# Run-time speed options


def test_compile_falls_back_to_eager_per_part_and_leaves_dynamo_config_alone(images):
    from torch._dynamo import config as dynamo_config

    torch.manual_seed(0)  # the tiny preset with one block per stage: dynamo traces every op before the backend fails
    tiny_model = meditok.build_meditok(meditok.get_config("tiny", vit_depth=1, decoder_vit_depth=1, conv_depths=(1, 1),
                                                          decoder_conv_depths=(1, 1))).eval()

    attempts = []

    def failing_backend(graph_module, example_inputs):
        attempts.append(len(example_inputs))
        raise RuntimeError("this backend cannot compile anything")

    suppress_before = dynamo_config.suppress_errors
    with torch.no_grad():
        expected = tiny_model.img_to_reconstructed_img(images)
    names_before = list(tiny_model.state_dict())
    try:
        tiny_model.speed_up(compile=True, backend=failing_backend)
        assert dynamo_config.suppress_errors == suppress_before           # no process-wide switch
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = tiny_model.img_to_reconstructed_img(images)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        for part in ("encoder", "decoder"):
            assert any(f"MedITok {part} failed" in m and "cannot compile anything" in m and "eagerly" in m
                       for m in messages), messages
        torch.testing.assert_close(out, expected)
        assert attempts and list(tiny_model.state_dict()) == names_before
        tried = len(attempts)
        with torch.no_grad():
            torch.testing.assert_close(tiny_model.img_to_reconstructed_img(images), expected)
        assert len(attempts) == tried                                     # fell back for good: no retry
        # Other compiled code in the process still reports its errors.
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
            torch.compile(lambda x: x * 2 + 1, backend=failing_backend)(torch.ones(3))
    finally:
        torch._dynamo.reset()


def test_a_part_that_compiles_runs_its_compiled_graph():
    from meditok.model import _compile_with_eager_fallback

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    part = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = part(x)
    try:
        _compile_with_eager_fallback(part, "test part", backend=counting_backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)                # no fallback taken
            torch.testing.assert_close(part(x), expected)
            torch.testing.assert_close(part(x), expected)
        assert len(graphs) == 1                                           # compiled once, then reused
        assert list(part.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    finally:
        torch._dynamo.reset()
