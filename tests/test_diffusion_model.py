"""Joint diffusion denoiser: bidirectional attention, AdaLN-zero identity at init, HF backbone loading."""
import pytest
import torch

from generation.diffusion.model import (AdaLNBlock, AdaLNWrappedLayer, DiffusionConfigError, JointDiffusionTransformer,
                                        check_same_architecture, get_config, load_hf_backbone)

V, K = 50, 64


def tiny_config(**overrides):
    base = dict(text_vocab_size=V, codebook_size=K, grid=(2, 3), text_len=6, condition_names=["ct", "mri"],
                condition_dropout=0.0)
    base.update(overrides)
    return get_config("tiny", **base)


def randomise(model, seed=0):
    """Give every parameter (incl. the zero-initialised AdaLN gates) random values, so that information
    can flow between positions; the tests are about the architecture, not the initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(cfg, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, V, (b, cfg.text_len), generator=g)
    image = torch.randint(0, K, (b, cfg.num_codebooks, cfg.num_positions), generator=g)
    t = torch.full((b,), 0.5)
    return text, image, t, t.clone(), torch.tensor([0, 1])[:b]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=V + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def assert_bidirectional(model, cfg):
    """Changing the LAST image position changes the logits at the FIRST text position and vice versa —
    the opposite of a causal model, whose position 0 sees nothing after it."""
    text, image, t_text, t_image, labels = inputs(cfg)
    model.eval()
    with torch.no_grad():
        text_logits, image_logits = model(text, image, t_text, t_image, labels)
        later = image.clone()
        later[:, :, -1] = (later[:, :, -1] + 1) % K
        text_logits2, image_logits2 = model(text, later, t_text, t_image, labels)
        assert (text_logits2[:, 0] - text_logits[:, 0]).abs().max() > 1e-5
        # and a text token at the end of the text changes image position 0
        text3 = text.clone()
        text3[:, -1] = (text3[:, -1] + 1) % V
        _, image_logits3 = model(text3, image, t_text, t_image, labels)
        assert (image_logits3[:, :, 0] - image_logits[:, :, 0]).abs().max() > 1e-5


def test_scratch_model_is_bidirectional():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = randomise(JointDiffusionTransformer(cfg))
    assert_bidirectional(model, cfg)


def test_output_shapes_and_mask_embedding():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = randomise(JointDiffusionTransformer(cfg)).eval()
    text, image, t_text, t_image, labels = inputs(cfg)
    text_logits, image_logits = model(text, image, t_text, t_image, labels)
    assert text_logits.shape == (2, cfg.text_len, V)
    assert image_logits.shape == (2, 8, cfg.num_positions, K)
    # A fully masked position is embedded with the mask embedding, whatever its other codes were.
    a, b = image.clone(), image.clone()
    a[:, :, 0] = K
    b[:, :, 0] = K
    b[:, 1:, 0] = 3  # only code 0 masked: still the mask embedding for the whole position
    b[:, 0, 0] = K
    assert torch.allclose(model.embed_image(a), model.embed_image(b))


def test_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    block = AdaLNBlock(width=32, heads=4, mlp_ratio=2.0)
    x, c = torch.randn(3, 7, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c), x)
    cfg = tiny_config()
    model = JointDiffusionTransformer(cfg)
    for blk in model.blocks:
        y = torch.randn(2, 5, cfg.width)
        assert torch.equal(blk(y, torch.randn(2, cfg.width)), y)


def test_hf_backbone_truncated_bidirectional(tiny_llama_dir):
    model_hf, width = load_hf_backbone(tiny_llama_dir, num_layers=2)
    assert width == 32 and len(model_hf.model.layers) == 2
    assert all(layer.self_attn.is_causal is False for layer in model_hf.model.layers)
    cfg = get_config("hf", backbone=str(tiny_llama_dir), num_layers=2, text_vocab_size=V, codebook_size=K,
                     grid=(2, 3), text_len=6, condition_names=["ct", "mri"], condition_dropout=0.0)
    torch.manual_seed(0)
    model = JointDiffusionTransformer(cfg)
    assert model.num_layers == 2 and all(isinstance(b, AdaLNWrappedLayer) for b in model.blocks)
    # AdaLN-zero around the pretrained layers: identity at init.
    x = torch.randn(2, cfg.text_len + cfg.num_positions, 32)
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand(2, -1)
    pe = model.rotary(x, pos)
    assert torch.equal(model.blocks[0](x, torch.randn(2, 32), position_embeddings=pe, position_ids=pos), x)
    # Pretrained text embedding reused.
    assert torch.equal(model.text_embed.weight, model_hf.model.embed_tokens.weight)
    assert_bidirectional(randomise(model), cfg)


def test_hf_wrapped_layer_with_unit_gate_is_the_pretrained_layer(tiny_llama_dir):
    """gate = 1, shift = scale = 0 must give exactly the pretrained (now bidirectional) layer."""
    model_hf, _ = load_hf_backbone(tiny_llama_dir, num_layers=1)
    layer = model_hf.model.layers[0]
    wrapped = AdaLNWrappedLayer(layer, 32)
    with torch.no_grad():
        wrapped.modulation[1].bias[64:] = 1.0  # gate chunk
    x = torch.randn(1, 5, 32)
    pos = torch.arange(5).unsqueeze(0)
    pe = model_hf.model.rotary_emb(x, pos)
    reference = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
    reference = reference[0] if isinstance(reference, tuple) else reference
    assert torch.allclose(wrapped(x, torch.zeros(1, 32), position_embeddings=pe, position_ids=pos), reference, atol=1e-6)


def test_bad_backbone_and_preset_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(DiffusionConfigError, match="not a folder with a transformers config.json"):
        load_hf_backbone(tmp_path / "no_such_model")
    with pytest.raises(DiffusionConfigError, match="num_layers=9 but backbone"):
        load_hf_backbone(tiny_llama_dir, num_layers=9)
    with pytest.raises(DiffusionConfigError, match="unknown diffusion preset 'XL'"):
        get_config("XL")
    with pytest.raises(DiffusionConfigError, match="preset 'hf' needs backbone"):
        get_config("hf")
    with pytest.raises(DiffusionConfigError, match="text_vocab_size is 0"):
        JointDiffusionTransformer(get_config("tiny"))
    saved, wanted = tiny_config(), tiny_config(depth=3)
    with pytest.raises(DiffusionConfigError, match="depth: checkpoint 2 vs requested 3"):
        check_same_architecture(saved, wanted, "run/latest.pt")
    model = JointDiffusionTransformer(tiny_config())
    text, image, t1, t2, labels = inputs(tiny_config())
    with pytest.raises(DiffusionConfigError, match="different image sizes"):
        model(text, image[:, :, :4], t1, t2, labels)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_other_hf_families_truncate_and_attend_both_ways(tmp_path, family):
    """Qwen 2 (SDPA) and Gemma 2 (no SDPA path: eager attention, √d embedding scale) load the same way."""
    import transformers

    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM)}[family]
    torch.manual_seed(0)
    model_cls(config_cls(vocab_size=V + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=128)).save_pretrained(tmp_path)
    cfg = get_config("hf", backbone=str(tmp_path), num_layers=2, text_vocab_size=V, codebook_size=K, grid=(2, 3),
                     text_len=6, condition_names=["ct", "mri"], condition_dropout=0.0)
    model = JointDiffusionTransformer(cfg)
    assert model.num_layers == 2
    assert all(block.layer.self_attn.is_causal is False for block in model.blocks)
    assert_bidirectional(randomise(model), cfg)
