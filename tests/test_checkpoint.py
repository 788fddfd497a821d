"""Checkpoint loading/saving: every supported source round-trips to identical outputs; bad files and
mismatched weights fail with messages that name the problem."""
import json
from pathlib import Path

import pytest
import torch

import meditok
from meditok import CheckpointError, load_meditok, save_meditok

REFERENCE_KEYS = Path(__file__).parent / "data" / "meditok_official_state_dict_keys.json"


def outputs(model, x):
    with torch.no_grad():
        ids = model.img_to_idx(x)
        return ids, model.idx_to_img(ids), model.encode_image(x)


def assert_same_outputs(a, b, x):
    for u, v in zip(outputs(a, x), outputs(b, x)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("name", ["tok.pth", "tok.safetensors", "tok_dir"])
def test_save_load_round_trip_without_naming_the_preset(tiny_model, images, tmp_path, name):
    path = save_meditok(tiny_model, tmp_path / name)
    loaded = load_meditok(path)  # preset comes from the stored config
    assert loaded.config == tiny_model.config
    assert not loaded.training
    assert_same_outputs(tiny_model, loaded, images)
    if name == "tok_dir":
        assert (path / "model.safetensors").exists()
        assert json.loads((path / "config.json").read_text())["preset"] == "tiny"
    if name == "tok.pth":  # our .pth holds only plain containers and tensors
        obj = torch.load(path, weights_only=True)
        assert obj["format"] == "meditok" and obj["config"]["preset"] == "tiny"


def test_released_style_bare_state_dict_is_detected(tiny_model, images, tmp_path):
    path = tmp_path / "meditok_simple_v1.pth"
    torch.save(tiny_model.state_dict(), path)  # what the release ships: a bare state dict, no config
    loaded = load_meditok(path)
    assert loaded.config.preset == "tiny"
    assert_same_outputs(tiny_model, loaded, images)


def test_full_training_checkpoint_with_nested_prefixed_weights(tiny_model, images, tmp_path):
    """Like the released trainer: ckpt['trainer']['model'] holds a DDP-wrapped TokenizerWrapper whose
    tokenizer lives under 'module.core.', beside a text tower, a discriminator and optimiser states."""
    sd = tiny_model.state_dict()
    wrapped = {f"module.core.{k}": v for k, v in sd.items()}
    wrapped["module.text_projection.weight"] = torch.zeros(768, 512)
    ckpt = {"args": {"lr": 5e-4, "model": "vitamin_large"}, "epoch": 3, "iter": 0,
            "trainer": {"model": wrapped, "disc": {"heads.0.weight": torch.zeros(2)}, "model_optim": {"state": {}}}}
    path = tmp_path / "meditok_ckpt_v1.pth"
    torch.save(ckpt, path)
    assert_same_outputs(tiny_model, load_meditok(path), images)

    # torch.compile's `_orig_mod.` wrapper is stripped as well
    compiled = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}}
    torch.save(compiled, tmp_path / "compiled.pth")
    assert_same_outputs(tiny_model, load_meditok(tmp_path / "compiled.pth"), images)


def test_choosing_among_several_tokenizers_with_key(tiny_model, images, tmp_path):
    other = meditok.build_meditok("tiny")
    torch.save({"model": tiny_model.state_dict(), "ema": other.state_dict()}, tmp_path / "two.pth")
    with pytest.warns(UserWarning, match="several tokenizer state dicts"):
        first = load_meditok(tmp_path / "two.pth")
    assert_same_outputs(tiny_model, first, images)
    assert_same_outputs(other, load_meditok(tmp_path / "two.pth", key="ema"), images)
    with pytest.raises(CheckpointError, match="no entry 'nope'"):
        load_meditok(tmp_path / "two.pth", key="nope")


def test_renamed_key_is_named_in_the_error(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    sd["decoder.norm.weigth"] = sd.pop("decoder.norm.weight")
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError) as err:
        load_meditok(tmp_path / "renamed.pth", preset="tiny")
    msg = str(err.value)
    assert "renamed.pth" in msg
    assert "missing keys (1): decoder.norm.weight" in msg
    assert "unexpected keys (1): decoder.norm.weigth" in msg
    # without a preset, nothing matches and the error says so
    with pytest.raises(CheckpointError, match="match none of the presets"):
        load_meditok(tmp_path / "renamed.pth")


def test_wrong_preset_lists_shape_mismatches_and_names_the_fitting_preset(tiny_model, tmp_path):
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as err:
        load_meditok(tmp_path / "tiny.pth", preset="large")
    msg = str(err.value)
    assert "do not fit MedITok preset 'large'" in msg
    assert "shape mismatches" in msg and "encoder.patch_embed.backbone.stem.conv1.weight: checkpoint [32, 3, 3, 3] vs model [160, 3, 3, 3]" in msg
    assert "missing keys" in msg  # large has 31 blocks, tiny 2
    assert "match preset 'tiny'" in msg


def test_pickled_objects_are_refused_not_executed(tiny_model, tmp_path):
    torch.save({"model": tiny_model.state_dict(), "args": Path("/tmp")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"refused: .*it would build pathlib.PosixPath.*never unpickles code"):
        load_meditok(tmp_path / "pickled.pth")


def test_missing_empty_and_truncated_files(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match=r"not found.*huggingface\.co/massaki75/meditok.*weights/README\.md"):
        load_meditok(tmp_path / "meditok_simple_v1.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_meditok(tmp_path / "nothing_here.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_meditok(tmp_path / "empty.pth")
    save_meditok(tiny_model, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_meditok(tmp_path / "cut.pth")
    save_meditok(tiny_model, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_meditok(tmp_path / "cut.safetensors")
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no MedITok weights found"):
        load_meditok(tmp_path / "other.pth")


def test_save_is_atomic_and_leaves_no_temp_files(tiny_model, tmp_path):
    save_meditok(tiny_model, tmp_path / "a.safetensors")
    save_meditok(tiny_model, tmp_path / "a.safetensors")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_hub_id_offline_without_cache_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_meditok("hf-hub:massaki75/meditok", cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert "massaki75/meditok" in msg and "HF_HUB_OFFLINE" in msg and "weights/" in msg


def test_hub_id_is_read_from_the_local_cache_offline(tiny_model, images, tmp_path, monkeypatch):
    """huggingface_hub's cache layout, filled by hand as a download would: offline mode then reads it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf"
    repo = cache / "models--someone--meditok-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_meditok(tiny_model, snap)  # model.safetensors + config.json
    loaded = load_meditok("someone/meditok-tiny", cache_dir=str(cache))
    assert_same_outputs(tiny_model, loaded, images)


def test_large_preset_matches_the_released_keys_one_by_one():
    """The released checkpoint's 1,186 names and shapes, against `large` built on the meta device."""
    reference = json.loads(REFERENCE_KEYS.read_text())
    assert len(reference) == 1186
    model = meditok.build_meditok("large", empty=True)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for key, shape in reference:
        if key not in ours:
            problems.append(f"missing {key}")
        elif ours[key] != shape:
            problems.append(f"{key}: ours {ours[key]} vs released {shape}")
    extra = sorted(set(ours) - {k for k, _ in reference})
    assert not problems and not extra, (problems[:20], extra[:20])
    # and such a state dict loads strictly (meta tensors: no memory), with preset detection
    released = {k: torch.empty(s, device="meta") for k, s in reference}
    assert meditok.matching_presets(released) == ["large"]
    assert not meditok.diff_state_dict(model, released)
    model.load_state_dict(released, strict=True, assign=True)
    assert model.quantizer.weight.shape == (8, 4096, 8)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(monkeypatch, tmp_path):
    """`runs/stage1_tiny` (no such run yet) must say "not found" without asking the Hub; `org/name` with no
    local folder of that name still goes to the Hub, and `hf-hub:` always does."""
    import huggingface_hub

    import meditok
    from meditok.checkpoint import looks_like_hub_id
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    asked = []

    def no_network(repo_id, filename, **kwargs):
        asked.append(repo_id)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    for missing in ("runs/stage1_tiny", "weights/mine", "./org/name", "a/b/c"):
        with pytest.raises(meditok.CheckpointError, match="Checkpoint not found: no file or folder at"):
            meditok.load_meditok(missing)
    assert asked == []
    (tmp_path / "myorg").mkdir()  # a local folder named like the organisation: a path, not a Hub id
    assert not looks_like_hub_id("myorg/model") and looks_like_hub_id("massaki75/meditok")
    with pytest.raises(meditok.CheckpointError, match="Hub repo 'massaki75/meditok'"):
        meditok.load_meditok("massaki75/meditok")
    assert asked and set(asked) == {"massaki75/meditok"}


def test_saved_files_follow_the_umask(tmp_path):
    """Checkpoints and tokenizers are readable by collaborators when the umask says so (the atomic writer's
    temp file is created owner-only; the final file gets a plain open's permissions)."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        save_meditok(meditok.build_meditok("tiny"), tmp_path / "tok")
        meditok.atomic_write(tmp_path / "x.bin", lambda f: f.write(b"1"))
    finally:
        os.umask(old)
    for path in (tmp_path / "tok" / "model.safetensors", tmp_path / "tok" / "config.json", tmp_path / "x.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    os.umask(0o077)
    try:
        meditok.atomic_write(tmp_path / "private.bin", lambda f: f.write(b"1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
