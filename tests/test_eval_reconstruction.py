"""Reconstruction CLI end to end on the example data, the FID Inception's local weights, modality names."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import meditok
from evaluation import fid_inception, reconstruction
from evaluation.paper import TABLE1_MEDITOK_RFID, table1_modality


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return str(meditok.save_meditok(meditok.build_meditok("tiny"), tmp_path_factory.mktemp("ckpt") / "tok"))


@pytest.mark.parametrize("label, column", [
    ("CT", "CT"), ("x-ray", "X-ray"), ("Xray", "X-ray"), ("CXR", "X-ray"), ("pathology", "Patho"), ("patho", "Patho"),
    ("dermoscopy", "Dermo"), ("derm", "Dermo"), ("Fundus", "Fundus"), ("ultrasound", "US"), ("MR", "MRI"),
    ("endoscopy", "Endo"), ("nuclear_medicine", None), ("microscopy", None), ("", None)])
def test_modality_labels_map_to_table1_columns(label, column):
    assert table1_modality(label) == column
    if column:
        assert column in TABLE1_MEDITOK_RFID


def test_cli_end_to_end_on_examples(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    assert reconstruction.main([
        "--checkpoint", tiny_checkpoint, "--csv", "datasets/meta/examples_val.csv", "--root", "datasets/examples",
        "--img-size", "64", "--random-inception", "--num-workers", "0", "--worst", "2", "--out", str(out),
        "--device", "cpu", "--quiet"]) == 0
    result = json.loads((out / "reconstruction.json").read_text())
    csv_rows = pd.read_csv("datasets/meta/examples_val.csv")
    per_image = pd.read_csv(out / "reconstruction_per_image.csv")
    assert list(per_image["identifier"]) == list(csv_rows["identifier"])
    groups = {row["modality"]: row for row in result["per_modality"]}
    # The examples' labels: ct, mri, ultrasound, fundus, pathology → Table 1 columns; microscopy stays as is.
    assert {"CT", "MRI", "US", "Fundus", "Patho", "microscopy"} == set(groups)
    assert groups["US"]["paper_rfid"] == TABLE1_MEDITOK_RFID["US"] and groups["microscopy"]["paper_rfid"] is None
    # Per-modality means are the means of the per-image values; the average is over modalities.
    for name, row in groups.items():
        chosen = per_image[per_image["group"] == name]
        assert row["images"] == len(chosen)
        assert row["psnr"] == pytest.approx(chosen["psnr"].mean(), rel=1e-5)
        assert row["ssim"] == pytest.approx(chosen["ssim"].mean(), rel=1e-5)
        assert row["rfid"] is None and "at least 2" in row["note"]       # one image per modality here
    # 'avg' is over the paper's Table 1 modalities only; microscopy is listed and averaged apart.
    average = result["average_over_modalities"]
    in_table1 = [r for name, r in groups.items() if name != "microscopy"]
    assert average["names"] == ["CT", "Fundus", "MRI", "Patho", "US"]
    assert average["psnr"] == pytest.approx(sum(r["psnr"] for r in in_table1) / len(in_table1))
    assert result["other_modalities"] == ["microscopy"]
    assert result["average_over_other_modalities"]["psnr"] == pytest.approx(groups["microscopy"]["psnr"])
    assert result["all_images"]["images"] == 6 and result["all_images"]["rfid"] is not None
    assert "meaningless" in result["all_images"]["note"]
    # Random Inception and random-free tokenizer: exactly one loud warning about rFID comparability.
    assert any("NOT comparable" in w for w in result["warnings"])
    assert not any("RANDOM WEIGHTS" in w for w in result["warnings"])
    assert "data_range=1" in result["conventions"]["ssim"]
    markdown = (out / "reconstruction.md").read_text()
    assert "paper MedITok" in markdown and "16.53" in markdown and "WARNING" in markdown
    assert len(list((out / "worst").glob("rank*.png"))) == 2 and len(result["worst_cases"]) == 2
    worst_two = sorted(per_image["psnr"])[:2]
    assert [w["psnr"] for w in result["worst_cases"]] == pytest.approx(worst_two, rel=1e-5)
    assert len(pd.read_csv(out / "reconstruction.csv")) == len(groups) + 1
    assert "wrote" in capsys.readouterr().out


def test_avg_is_over_the_papers_eight_modalities_and_extras_are_listed_apart():
    """A run with all 8 Table 1 modalities plus one more: 'avg' must be the 8-modality mean printed beside the
    paper's, with the extra modality named and averaged separately."""
    rng = np.random.default_rng(0)
    groups = reconstruction.OrderedDict()
    for name in ["nuclear medicine"] + list(reconstruction.TABLE1_MODALITIES):
        group = reconstruction.GroupResult(reconstruction.modality_group(name), labels={name})
        group.psnr, group.ssim = list(rng.uniform(20, 40, 3)), list(rng.uniform(0.5, 0.99, 3))
        groups[group.name] = group
    everything = reconstruction.GroupResult("all images", psnr=[v for g in groups.values() for v in g.psnr],
                                            ssim=[v for g in groups.values() for v in g.ssim])
    summary = reconstruction.summarise({"groups": groups, "all": everything}, min_fid_images=50, with_fid=False)
    paper_groups = [groups[m] for m in reconstruction.TABLE1_MODALITIES]
    expected_psnr = sum(sum(g.psnr) / 3 for g in paper_groups) / 8
    expected_ssim = 100 * sum(sum(g.ssim) / 3 for g in paper_groups) / 8
    average = summary["average_over_modalities"]
    assert average["modalities"] == 8 and average["names"] == list(reconstruction.TABLE1_MODALITIES)
    assert average["psnr"] == pytest.approx(expected_psnr) and average["ssim"] == pytest.approx(expected_ssim)
    assert summary["other_modalities"] == ["nuclear medicine"] and summary["table1_columns_missing"] == []
    extra = groups["nuclear medicine"]
    assert summary["average_over_other_modalities"]["psnr"] == pytest.approx(sum(extra.psnr) / 3)
    info = {"tokenizer": {"source": "test"}, "data": {"source": "test", "img_size": 64}, "warnings": [],
            "conventions": reconstruction.CONVENTIONS, "fid_network": {}}
    markdown = reconstruction.to_markdown(summary, info, [])
    table1_header = next(line for line in markdown.splitlines() if line.startswith("|  | CT rFID"))
    assert "nuclear medicine" not in table1_header                        # no extra column beside the paper's
    assert "left out of 'avg': nuclear medicine" in markdown
    assert "mean over the 8 Table 1 modalities" in markdown


def test_folder_input_without_fid(tmp_path):
    out = tmp_path / "out"
    assert reconstruction.main([
        "--preset", "tiny", "--random-weights", "--folder", "datasets/examples", "--max-images", "5",
        "--img-size", "64", "--no-fid", "--num-workers", "0", "--worst", "0", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "reconstruction.json").read_text())
    assert result["all_images"]["images"] == 5
    assert all(row["rfid"] is None for row in result["per_modality"])
    assert any("RANDOM WEIGHTS" in w for w in result["warnings"])
    # Folder modalities come from the first sub-folder (sorted files: ct/ first).
    assert result["per_modality"][0]["modality"] == "CT"


def test_missing_inception_weights_say_what_to_do(tmp_path, tiny_checkpoint):
    missing = tmp_path / "external" / fid_inception.FID_INCEPTION_FILENAME
    with pytest.raises(SystemExit) as exit_info:
        reconstruction.main(["--checkpoint", tiny_checkpoint, "--csv", "datasets/meta/examples_val.csv",
                             "--root", "datasets/examples", "--inception-weights", str(missing), "--quiet"])
    message = str(exit_info.value)
    assert str(missing.resolve()) in message                     # where it is expected
    assert fid_inception.FID_INCEPTION_URL in message            # where to get it
    assert "--random-inception" in message and "--no-fid" in message


def test_inception_weights_are_checked_and_loaded_from_the_local_file(tmp_path):
    wrong = tmp_path / fid_inception.FID_INCEPTION_FILENAME
    wrong.write_bytes(b"not the weights")
    with pytest.raises(fid_inception.InceptionWeightsError, match="SHA-256"):
        fid_inception.build_fid_inception(wrong)
    # A file with the FID network's layout loads through torch.load(weights_only=True) into pytorch-fid's
    # InceptionV3 and gives the same features as the same weights built in memory.
    state_dict = fid_inception.random_inception_state_dict(seed=3)
    local = tmp_path / "weights.pth"
    torch.save(state_dict, local)
    from_file = fid_inception.build_fid_inception(local, sha256_prefix=None)
    assert all(torch.equal(from_file.state_dict()[f"blocks.0.0.{k[len('Conv2d_1a_3x3.'):]}"], v)
               for k, v in state_dict.items() if k.startswith("Conv2d_1a_3x3."))
    in_memory = fid_inception.build_fid_inception(random_weights=True, seed=3)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = fid_inception.inception_features(from_file, images)
    assert features.shape == (1, fid_inception.FEATURE_DIM)
    assert torch.allclose(features, fid_inception.inception_features(in_memory, images))


def test_help_states_the_conventions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reconstruction.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--checkpoint", "--csv", "--folder", "--inception-weights", "--random-inception", "data range 1",
                   "uint8", fid_inception.FID_INCEPTION_FILENAME):
        assert phrase in text


def test_unreadable_images_stop_the_run_or_are_left_out(tmp_path):
    rows = pd.read_csv("datasets/meta/examples_val.csv").head(3)
    rows.loc[1, "identifier"] = "mri/does_not_exist.png"
    rows.to_csv(tmp_path / "with_missing.csv", index=False)
    common = ["--preset", "tiny", "--random-weights", "--csv", str(tmp_path / "with_missing.csv"), "--root",
              "datasets/examples", "--img-size", "64", "--no-fid", "--num-workers", "0", "--worst", "0", "--quiet",
              "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="does_not_exist.png"):
        reconstruction.main(common)
    assert reconstruction.main(common + ["--on-error", "skip"]) == 0
    result = json.loads((tmp_path / "out" / "reconstruction.json").read_text())
    assert result["all_images"]["images"] == 2                      # left out, not replaced by another image
    assert len(result["unreadable"]) == 1 and "does_not_exist.png" in result["unreadable"][0]
    assert any("unreadable" in w for w in result["warnings"])


def _nan_ct_nifti(path, all_nan=False):
    """A [48, 48, 3] CT volume, its middle axial slice partly (or, with all_nan, entirely) NaN."""
    volume = np.random.default_rng(0).normal(0, 300, (48, 48, 3)).astype(np.float32)
    volume[10:20, 10:22, :] = np.nan
    if all_nan:
        volume[:] = np.nan
    import nibabel as nib
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))


def test_nan_ct_images_give_no_psnr(tmp_path):
    """A NaN CT NIfTI used to become NaN pixels, quantised to an arbitrary grey, with a finite PSNR and rc 0."""
    _nan_ct_nifti(tmp_path / "nan_ct.nii.gz")
    rows = pd.read_csv("datasets/meta/examples_val.csv").head(2)
    rows.loc[len(rows)] = {**rows.iloc[0].to_dict(), "identifier": str(tmp_path / "nan_ct.nii.gz"), "modality": "ct"}
    rows.to_csv(tmp_path / "with_nan.csv", index=False)
    common = ["--preset", "tiny", "--random-weights", "--csv", str(tmp_path / "with_nan.csv"), "--root",
              "datasets/examples", "--img-size", "64", "--no-fid", "--num-workers", "0", "--worst", "0", "--quiet",
              "--out", str(tmp_path / "out"), "--allow-outside-root"]  # the NIfTI lies outside --root
    with pytest.raises(SystemExit, match=r"nan_ct.nii.gz: 120 of 2304 pixel values are not finite"):
        reconstruction.main(common)
    assert not (tmp_path / "out" / "reconstruction.json").exists()
    assert reconstruction.main(common + ["--on-error", "skip"]) == 0
    result = json.loads((tmp_path / "out" / "reconstruction.json").read_text())
    assert result["all_images"]["images"] == 2 and all(np.isfinite(result["all_images"][k]) for k in ("psnr", "ssim"))
    assert "nan_ct" not in " ".join(pd.read_csv(tmp_path / "out" / "reconstruction_per_image.csv")["identifier"])
    assert len(result["unreadable"]) == 1 and "not finite" in result["unreadable"][0]


def test_non_finite_pixels_never_give_a_finite_metric():
    from evaluation.metrics import NonFiniteImageError, psnr, quantize_to_uint8

    reference = torch.zeros(3, 3, 16, 16)
    test = reference + 0.1
    test[0, 0, 0, 0] = float("nan")
    test[1, 2, 3, 4] = float("inf")
    values = psnr(reference, test)
    assert torch.isnan(values[:2]).all() and values[2] == pytest.approx(20.0)   # 10·log10(1/0.01)
    with pytest.raises(NonFiniteImageError, match="2 of 2304 values are not finite"):
        quantize_to_uint8(test)
    identifiers = ["a.png", "b.png", "c.png"]
    with pytest.raises(NonFiniteImageError, match=r"image a.png, b.png holds NaN/Inf"):
        reconstruction.refuse_non_finite(test, identifiers, "image")
    reconstruction.refuse_non_finite(reference, identifiers, "image")   # finite: no error
