"""BiomedCLIP teachers (local_openclip): tiny variant written and read back through the real loading code,
frozen behaviour, preprocessing against open_clip's own PIL transform, tokenizer, and errors that name files."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import local_openclip
from local_openclip import constants
from local_openclip.teachers import resolve_biomedclip_source


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return local_openclip.make_tiny_biomedclip(tmp_path_factory.mktemp("tiny") / "biomedclip", seed=0)


@pytest.fixture(scope="module")
def vision_teacher(tiny_clip_dir):
    return local_openclip.load_vision_teacher(tiny_clip_dir)


@pytest.fixture(scope="module")
def text_teacher(tiny_clip_dir):
    return local_openclip.load_text_teacher(tiny_clip_dir)


def smooth_images(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
    return nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)


def test_tiny_folder_has_the_real_layout_and_is_small(tiny_clip_dir):
    names = sorted(p.name for p in tiny_clip_dir.iterdir())
    assert names == ["config.json", "open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer.json",
                     "tokenizer_config.json"]
    config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision["timm_pool"] == "" and vision["timm_proj"] == "linear" and vision["image_size"] == 224
    assert text["hf_pooler_type"] == "cls_last_hidden_state_pooler" and text["context_length"] == 256
    assert sum(p.stat().st_size for p in tiny_clip_dir.iterdir()) < 5e6


def test_tiny_is_deterministic_and_loaded_weights_come_from_disk(tiny_clip_dir, vision_teacher, tmp_path):
    again = local_openclip.make_tiny_biomedclip(tmp_path / "again", seed=0)
    for name in ("open_clip_pytorch_model.bin", "tokenizer.json", "config.json", "open_clip_config.json"):
        assert (again / name).read_bytes() == (tiny_clip_dir / name).read_bytes(), name
    saved = torch.load(tiny_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    trunk_state = vision_teacher.trunk.state_dict()
    for key, value in trunk_state.items():
        assert torch.equal(value, saved["visual.trunk." + key]), key
    # a different seed gives different weights, so equality above is not an accident of initialisation
    other = local_openclip.load_vision_teacher(local_openclip.make_tiny_biomedclip(tmp_path / "seed1", seed=1))
    images = smooth_images(2, 64, 64)
    assert not torch.allclose(other(images), vision_teacher(images))
    reloaded = local_openclip.load_vision_teacher(again)
    assert torch.equal(reloaded(images), vision_teacher(images))


def test_vision_teacher_output_and_frozen(vision_teacher):
    assert vision_teacher.output_dim == 64 and vision_teacher.image_size == (224, 224)
    images = smooth_images(2, 128, 128).requires_grad_(True)
    parent = nn.Sequential(vision_teacher)
    parent.train()
    assert not vision_teacher.training and not vision_teacher.trunk.training
    assert all(not m.training for m in vision_teacher.modules())
    assert all(not p.requires_grad for p in vision_teacher.parameters())
    features = vision_teacher(images)
    assert features.shape == (2, 64) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert not features.requires_grad


@pytest.mark.parametrize("height,width", [(256, 256), (256, 320), (300, 200), (224, 224)])
def test_vision_preprocessing_matches_open_clip_pil_transform(vision_teacher, tiny_clip_dir, height, width):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    pil_transform = image_transform_v2(PreprocessCfg(size=size, **config["preprocess_cfg"]), is_train=False)
    rng = np.random.default_rng(height + width)
    pixels = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    reference = pil_transform(pixels).unsqueeze(0)
    as_tokenizer_input = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().unsqueeze(0) / 255 * 2 - 1
    ours = vision_teacher.preprocess(as_tokenizer_input)
    assert ours.shape == reference.shape == (1, 3, size, size)
    difference = (ours - reference).abs()
    # PIL resamples uint8 and rounds: about one grey level (1/255/0.27 ≈ 0.015 after normalisation) apart.
    assert difference.max() < 0.03 and difference.mean() < 0.01


def test_text_teacher_tokenizer_and_output(text_teacher, tiny_clip_dir):
    captions = ["Axial CT of the chest showing a small nodule.", "fundus photograph"]
    ids = text_teacher.tokenize(captions)
    assert ids.shape == (2, 256) and ids.dtype == torch.int64 and text_teacher.context_length == 256
    vocabulary = text_teacher.tokenizer.tokenizer
    assert ids[0, 0] == vocabulary.cls_token_id and (ids[0] == vocabulary.sep_token_id).sum() == 1
    assert ids[0, -1] == vocabulary.pad_token_id == 0
    assert vocabulary.convert_ids_to_tokens(ids[0, 1:5].tolist()) == ["axial", "ct", "of", "the"]
    standalone = local_openclip.load_tokenizer(tiny_clip_dir)
    assert torch.equal(standalone(captions), ids)
    assert standalone("one caption").shape == (1, 256)  # the data pipeline's per-sample call
    assert torch.equal(pickle.loads(pickle.dumps(standalone))(captions), ids)  # DataLoader workers

    nn.Sequential(text_teacher).train()
    assert not text_teacher.training and all(not p.requires_grad for p in text_teacher.parameters())
    features = text_teacher(ids)
    assert features.shape == (2, text_teacher.output_dim) == (2, 32) and not features.requires_grad
    assert torch.equal(features, text_teacher(ids))  # eval mode: no dropout
    with pytest.raises(TypeError, match="token ids"):
        text_teacher(ids.float())


def test_text_teacher_drops_all_padding_columns_without_changing_the_features(text_teacher):
    """trim_padding keeps the longest caption's tokens; the features equal the tower's on the full 256-token
    context, computed here through the tower itself (no trimming)."""
    ids = text_teacher.tokenize(["Axial CT of the chest showing a small nodule.", "fundus photograph"])
    longest = int((ids != 0).sum(dim=1).max())
    kept = -(-longest // 8) * 8  # rounded up to a multiple of 8
    trimmed = text_teacher.trim_padding(ids)
    assert longest < kept < 256 and trimmed.shape == (2, kept) and torch.equal(trimmed, ids[:, :kept])
    with torch.no_grad():
        full_context = text_teacher.text(ids)
    torch.testing.assert_close(text_teacher(ids), full_context, rtol=1e-5, atol=1e-6)
    assert text_teacher.trim_padding(torch.zeros(2, 256, dtype=torch.long)).shape == (2, 8)  # all padding
    assert text_teacher.trim_padding(ids[:, :5]).shape == (2, 5)  # never longer than it was


def test_missing_or_broken_folders_raise_errors_that_name_the_file(tiny_clip_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        local_openclip.load_vision_teacher(missing)
    assert "external/README.md" in str(error.value)

    broken = tmp_path / "no_text_config"
    broken.mkdir()
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_clip_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_biomedclip_source(broken)

    (broken / "config.json").write_bytes((tiny_clip_dir / "config.json").read_bytes())
    (broken / "stray.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="several checkpoint files"):
        resolve_biomedclip_source(broken)

    (broken / "stray.safetensors").unlink()
    (broken / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        resolve_biomedclip_source(broken)


def test_default_locations_and_overrides(monkeypatch, tmp_path):
    for variable in ("MEDITOK_EXTERNAL", "MEDITOK_BIOMEDCLIP", "MEDITOK_DINO", "MEDITOK_LPIPS_VGG", "MEDITOK_TINY"):
        monkeypatch.delenv(variable, raising=False)
    root = constants.REPO_ROOT
    assert constants.default_location(constants.BIOMEDCLIP_LOCAL_DIR) == str(root / "external" / "biomedclip")
    monkeypatch.setenv("MEDITOK_EXTERNAL", str(tmp_path))
    assert constants.default_location(constants.LPIPS_VGG_PATH) == str(tmp_path / "vgg16.pth")
    assert constants.tiny_location("dinov2") == str(tmp_path / "tiny" / "dinov2")
    monkeypatch.setenv("MEDITOK_BIOMEDCLIP", constants.BIOMEDCLIP_HUB_ID)
    assert resolve_biomedclip_source(None).hub_id == constants.BIOMEDCLIP_HUB_ID


@pytest.mark.skipif(not os.path.isdir(constants.default_location(constants.BIOMEDCLIP_LOCAL_DIR)),
                    reason="real BiomedCLIP not in external/biomedclip (see external/README.md)")
def test_real_biomedclip_dimensions():
    vision = local_openclip.load_vision_teacher()
    assert vision.output_dim == 768 and vision.image_size == (224, 224)
    assert vision(smooth_images(1, 256, 256)).shape == (1, 768)
    text = local_openclip.load_text_teacher()
    assert text.context_length == 256 and text(text.tokenize(["chest x-ray"])).shape == (1, 512)
