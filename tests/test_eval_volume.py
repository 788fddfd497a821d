"""3D CLI end to end on small NIfTI volumes: volume-level metrics, rFID over slices, probing on volume features."""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import meditok
from evaluation import volume
from evaluation.metrics import psnr, quantize_to_uint8


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return str(meditok.save_meditok(meditok.build_meditok("tiny"), tmp_path_factory.mktemp("ckpt") / "tok"))


def _write_volume(path, radius, modality, seed):
    """A [20, 24, 8] volume holding a ball of the given radius: HU for CT, arbitrary units for MRI."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(np.arange(20), np.arange(24), np.arange(8), indexing="ij")
    ball = ((x - 10) ** 2 + (y - 12) ** 2 + ((z - 4) * 2) ** 2) < radius ** 2
    if modality == "ct":
        values = np.where(ball, 40.0, -1000.0) + rng.normal(0, 10, ball.shape)
    else:
        values = np.where(ball, 800.0, 50.0) + rng.normal(0, 20, ball.shape)
    nib.save(nib.Nifti1Image(values.astype(np.float32), np.diag([1.5, 1.5, 3.0, 1.0])), str(path))


def test_cli_end_to_end_with_probe(tmp_path, tiny_checkpoint):
    rows = []
    for i in range(8):
        label = i % 2
        modality = "ct" if i < 4 else "mri"
        name = f"vol{i}.nii.gz"
        _write_volume(tmp_path / name, 4 + 4 * label, modality, seed=i)
        rows.append({"identifier": name, "modality": modality, "label": ["small", "large"][label],
                     "split": "test" if i in (2, 3, 6, 7) else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "volumes.csv", index=False)
    out = tmp_path / "out"
    assert volume.main(["--checkpoint", tiny_checkpoint, "--csv", str(tmp_path / "volumes.csv"), "--root", str(tmp_path),
                        "--img-size", "32", "--step", "2", "--no-fid", "--probe-epochs", "3", "--out", str(out),
                        "--quiet", "--device", "cpu"]) == 0
    result = json.loads((out / "volume.json").read_text())
    assert [v["identifier"] for v in result["volumes"]] == [r["identifier"] for r in rows]
    assert all(v["slices"] == 4 and v["shape"] == [20, 24, 8] for v in result["volumes"])   # axial, every 2nd of 8
    assert result["overall"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in result["volumes"]]))
    probe_rows = {r["features"]: r for r in result["probe"]["rows"]}
    assert set(probe_rows) == {"grid", "pooled"}
    assert probe_rows["grid"]["feature_dim"] == 4 * 64 and probe_rows["grid"]["n_test"] == 4   # 32 px → 2×2 tokens
    assert result["probe"]["classes"] == {"large": 0, "small": 1}
    assert all(0 <= r["best_map_two_class"] <= 100 for r in probe_rows.values())    # binary: both mAP conventions
    assert len(pd.read_csv(out / "volume_probe_history.csv")) == 2 * 3
    markdown = (out / "volume.md").read_text()
    assert "Table S2" in markdown and "97.71" in markdown


def test_volume_psnr_is_over_all_voxels_and_rfid_is_reported(tmp_path, tiny_checkpoint):
    _write_volume(tmp_path / "ball.nii", 6, "mri", seed=0)
    out = tmp_path / "out"
    assert volume.main(["--checkpoint", tiny_checkpoint, "--volumes", str(tmp_path / "ball.nii"), "--modality", "mri",
                        "--img-size", "32", "--step", "4", "--random-inception", "--out", str(out), "--quiet",
                        "--device", "cpu"]) == 0
    result = json.loads((out / "volume.json").read_text())
    assert result["overall"]["rfid"] is not None and any("NOT comparable" in w for w in result["warnings"])
    assert "skipped" in result["probe"]
    # Recompute the volume PSNR from the pieces the CLI uses: one MSE over every voxel of the evaluated slices.
    model = meditok.load_meditok(tiny_checkpoint).eval()
    signed = volume.volume_to_signed(nib.load(str(tmp_path / "ball.nii")).get_fdata().astype(np.float32), "mri", "common")
    slices = volume.volume_slices(signed, axis=2, step=4, img_size=32)
    with torch.no_grad():
        reconstruction = model.img_to_reconstructed_img(slices)
    original01 = quantize_to_uint8(slices[:, 0]).double() / 255
    reconstruction01 = quantize_to_uint8(reconstruction.mean(dim=1)).double() / 255
    expected = psnr(original01.reshape(1, -1), reconstruction01.reshape(1, -1)).item()
    assert result["volumes"][0]["psnr"] == pytest.approx(expected, rel=1e-6)
    assert result["volumes"][0]["slices"] == 2


def test_help_and_missing_modality(capsys):
    with pytest.raises(SystemExit) as exit_info:
        volume.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--volumes", "--csv", "--axis", "--step", "--ct-window", "NIfTI", "DICOM"):
        assert phrase in text
    with pytest.raises(SystemExit, match="--modality"):
        volume.main(["--preset", "tiny", "--random-weights", "--volumes", "x.nii"])


def test_nan_volumes_are_refused_not_scored(tmp_path, tiny_checkpoint, capsys):
    """An all-NaN CT volume used to score PSNR 8.36 dB with rc 0; a partly NaN one a finite PSNR too."""
    for name, nan_block in (("all_nan_ct.nii.gz", np.s_[:]), ("part_nan_ct.nii.gz", np.s_[2:6, 3:9, :])):
        _write_volume(tmp_path / name, 6, "ct", seed=0)
        values = nib.load(str(tmp_path / name)).get_fdata().astype(np.float32)
        values[nan_block] = np.nan
        nib.save(nib.Nifti1Image(values, np.eye(4)), str(tmp_path / name))
        out = tmp_path / f"out_{name}"
        with pytest.raises(SystemExit) as exit_info:
            volume.main(["--checkpoint", tiny_checkpoint, "--volumes", str(tmp_path / name), "--modality", "ct",
                         "--img-size", "32", "--no-fid", "--out", str(out), "--quiet", "--device", "cpu"])
        count = values.size if name.startswith("all") else 4 * 6 * 8
        assert str(exit_info.value) == (f"error: {tmp_path / name}: {count} of {values.size} voxel values are not "
                                        f"finite ({count} NaN, 0 +/-Inf). Fix: replace them in the file (e.g. with the "
                                        "background value: -1024 HU for CT, 0 for MR) and save it again, or leave the "
                                        "file out; no value is guessed for them, and scripts/data/quality_control.py "
                                        "drops such files")
        assert not (out / "volume.json").exists()


def test_empty_volume_csv_and_missing_volume_files_are_refused(tmp_path):
    (tmp_path / "empty.csv").write_text("identifier,modality,label,split\n")
    with pytest.raises(SystemExit, match=r"empty.csv: volume CSV has no rows"):
        volume.main(["--preset", "tiny", "--random-weights", "--csv", str(tmp_path / "empty.csv"), "--no-fid",
                     "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert not (tmp_path / "out" / "volume.json").exists()
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(SystemExit) as exit_info:
        volume.main(["--preset", "tiny", "--random-weights", "--volumes", str(missing), "--modality", "ct",
                     "--no-fid", "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    message = str(exit_info.value)
    assert message.count(str(missing)) == 1 and "not found" in message and "--volumes" in message
    assert "CSV" not in message
