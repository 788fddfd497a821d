"""Loss networks of training: LPIPS(VGG), the DINOv2 discriminator and differentiable augmentation."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tokenizer_training.diffaug import (DiffAugmentParams, apply_diff_augment, diff_augment, sample_diff_augment)
from tokenizer_training.discriminator import (DinoDiscriminator, DinoFit, build_discriminator, load_dino_backbone, make_tiny_dino)
from tokenizer_training.perceptual import build_lpips


def smooth_images(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
    return nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------
# LPIPS
@pytest.fixture(scope="module")
def lpips_random():
    return build_lpips("random")


def test_lpips_zero_on_identical_symmetric_per_sample(lpips_random):
    x, y = smooth_images(3, 64, 64, seed=1), smooth_images(3, 64, 64, seed=2)
    distance = lpips_random(x, y)
    assert distance.shape == (3,) and (distance > 0).all()
    assert torch.equal(lpips_random(x, x), torch.zeros(3))
    assert torch.allclose(distance, lpips_random(y, x))
    assert torch.allclose(lpips_random(x[:1], y[:1]), distance[:1])


def test_lpips_frozen_but_differentiable_in_the_input(lpips_random):
    nn.Sequential(lpips_random).train()
    assert all(not m.training for m in lpips_random.modules())
    assert all(not p.requires_grad for p in lpips_random.parameters())
    x = smooth_images(2, 32, 32, seed=3).requires_grad_(True)
    lpips_random(x, smooth_images(2, 32, 32, seed=4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_loads_torchvision_format_backbone(lpips_random, tmp_path):
    # A torchvision-format file ('features.N.weight'/'bias') with weights unlike the random backbone's.
    backbone = lpips_random.lpips.net
    features = {}
    for part in (backbone.slice1, backbone.slice2, backbone.slice3, backbone.slice4, backbone.slice5):
        for index, layer in part.named_children():
            for name, tensor in layer.state_dict().items():
                features[f"features.{index}.{name}"] = tensor * 0.5 + 0.01
    path = tmp_path / "vgg16.pth"
    torch.save(features, path)
    rng_before = torch.get_rng_state()
    loaded = build_lpips(path)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding the init must not disturb the caller's RNG
    conv0 = loaded.lpips.net.slice1[0]
    assert torch.equal(conv0.weight, features["features.0.weight"]) and loaded.vgg_source == str(path)
    x, y = smooth_images(2, 32, 32, seed=5), smooth_images(2, 32, 32, seed=6)
    assert not torch.allclose(loaded(x, y), lpips_random(x, y))


def test_lpips_missing_file_error_names_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_lpips(tmp_path / "absent_vgg16.pth")
    message = str(error.value)
    assert "absent_vgg16.pth" in message and "vgg16-397923af.pth" in message and "IMAGENET1K_V1" in message


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 discriminator
@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory) -> Path:
    return make_tiny_dino(tmp_path_factory.mktemp("tiny") / "dinov2", seed=0)


@pytest.fixture
def discriminator(tiny_dino_dir):
    torch.manual_seed(0)
    return build_discriminator(tiny_dino_dir)


def test_tiny_dino_saved_and_loaded_back_identically(tiny_dino_dir, tmp_path):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        in_memory = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518,
                                      embed_dim=32, depth=12, num_heads=2, dynamic_img_size=True).eval()
    loaded = load_dino_backbone(tiny_dino_dir)
    assert set(loaded.state_dict()) == set(in_memory.state_dict())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in in_memory.state_dict().items())
    x = smooth_images(1, 56, 56)
    assert torch.equal(loaded(x), in_memory(x))
    rng_before = torch.get_rng_state()
    again = make_tiny_dino(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert (again / "model.safetensors").read_bytes() == (tiny_dino_dir / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (tiny_dino_dir / "config.json").read_bytes()
    assert sum(p.stat().st_size for p in tiny_dino_dir.iterdir()) < 2e6


def test_discriminator_shape_and_gradients(discriminator):
    images = smooth_images(2, 64, 64).requires_grad_(True)  # 64 → 56 px: 4×4 patches + class token per block
    logits = discriminator(images)
    assert logits.shape == (2, 5 * (1 + 4 * 4))
    logits.mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the generator's adversarial loss needs this
    assert all(p.grad is None and not p.requires_grad for p in discriminator.dino.parameters())
    assert all(p.grad is not None for p in discriminator.heads.parameters())


def test_discriminator_modes_heads_and_fit(discriminator):
    nn.Sequential(discriminator).train()
    assert discriminator.heads.training and not discriminator.dino.training
    assert discriminator.fitted_size(256, 256) == (252, 252) and discriminator.fitted_size(56, 70) == (56, 70)
    head = discriminator.heads[0]
    assert head.residual[0].padding_mode == "circular" and head.residual[0].kernel_size == (9,)
    assert isinstance(head.entry[1], nn.GroupNorm) and head.entry[1].num_groups == 32
    images = smooth_images(2, 64, 64)
    crop = discriminator.prepare(images, fit="crop", generator=torch.Generator().manual_seed(0))
    assert crop.shape == (2, 3, 56, 56)
    same = discriminator.prepare(images, fit="crop", generator=torch.Generator().manual_seed(0))
    assert torch.equal(crop, same)
    drawn = discriminator.draw_fit(64, 64, generator=torch.Generator().manual_seed(3))  # train mode: random
    assert drawn.mode in ("crop", "resize")
    assert torch.equal(discriminator(images, fit=drawn), discriminator(images, fit=drawn))  # BCR-style replay
    assert discriminator.draw_fit(56, 56).mode == "none"
    discriminator.eval()
    assert torch.equal(discriminator(images), discriminator(images))  # eval: deterministic area resize
    already_fitted = smooth_images(1, 56, 56)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(discriminator.prepare(already_fitted), ((already_fitted + 1) / 2 - mean) / std)


def test_discriminator_rejects_bad_configuration(tiny_dino_dir, tmp_path):
    dino = load_dino_backbone(tiny_dino_dir)
    with pytest.raises(ValueError, match="divisible by 32"):
        DinoDiscriminator(dino, head_channels=48)
    with pytest.raises(ValueError, match="12 blocks"):
        DinoDiscriminator(dino, block_indices=(0, 12))
    with pytest.raises(ValueError, match="does not bring"):
        DinoDiscriminator(dino).prepare(smooth_images(1, 64, 64), fit=DinoFit("none"))
    with pytest.raises(FileNotFoundError, match="absent_dino"):
        build_discriminator(tmp_path / "absent_dino")


def test_original_dinov2_checkpoint_file_loads(tmp_path):
    """The facebookresearch file (`dinov2_vits14_pretrain.pth`: timm keys + `mask_token`) loads strictly by path."""
    import timm

    torch.manual_seed(1)
    reference = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    state = dict(reference.state_dict(), mask_token=torch.zeros(1, 384))
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = load_dino_backbone(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Differentiable augmentation
def test_diff_augment_shapes_ranges_and_gradients():
    x = smooth_images(4, 32, 32).requires_grad_(True)
    y = diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    # colour jitter: brightness ±0.5, saturation ×[0, 2], contrast ×[0.5, 1.5] of values in [-1, 1]
    assert y.abs().max() < 8
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    geometric = diff_augment(x.detach(), policy="translation,cutout", generator=torch.Generator().manual_seed(1))
    assert geometric.min() >= min(x.min().item(), 0) and geometric.max() <= max(x.max().item(), 0)
    assert (geometric == 0).any()  # cutout / translation fill
    assert torch.equal(diff_augment(x, policy=""), x)
    with pytest.raises(ValueError, match="unknown"):
        diff_augment(x, policy="color,rotate")


def test_diff_augment_shared_parameters_give_identical_transforms():
    real, fake = smooth_images(3, 32, 32, seed=1), smooth_images(3, 32, 32, seed=2)
    params = sample_diff_augment(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert params.cutout_size == (6, 6) and params.shift.abs().max() <= 4
    assert torch.equal(apply_diff_augment(real, params), apply_diff_augment(real.clone(), params))
    # the same geometry for both batches: zeros (cutout + translation border) in exactly the same places
    ones = apply_diff_augment(torch.ones(3, 3, 32, 32), DiffAugmentParams(3, 32, 32, shift=params.shift,
                                                                          cutout_start=params.cutout_start,
                                                                          cutout_size=params.cutout_size))
    twos = apply_diff_augment(2 * torch.ones(3, 3, 32, 32), DiffAugmentParams(3, 32, 32, shift=params.shift,
                                                                              cutout_start=params.cutout_start,
                                                                              cutout_size=params.cutout_size))
    assert torch.equal(ones == 0, twos == 0) and (ones == 0).any()
    augmented, drawn = diff_augment(real, generator=torch.Generator().manual_seed(0), return_params=True)
    assert torch.equal(augmented, apply_diff_augment(real, params)) and torch.equal(drawn.shift, params.shift)
    assert torch.equal(diff_augment(fake, params=drawn), apply_diff_augment(fake, params))
    with pytest.raises(ValueError, match="drawn for"):
        apply_diff_augment(smooth_images(2, 32, 32), params)


def test_translation_moves_pixels_exactly():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(1, 3, 1, 1) + 1
    shifted = apply_diff_augment(x, DiffAugmentParams(1, 4, 4, shift=torch.tensor([[1, -1]])))
    expected = torch.zeros_like(x)
    expected[:, :, 1:, :3] = x[:, :, :3, 1:]  # down by one row, left by one column, zeros shifted in
    assert torch.equal(shifted, expected)
