"""gFID and diversity (paper Table 3) against independent computations, and the evaluation.synthesis CLI."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.fid_inception import build_fid_inception, inception_features
from evaluation.generation_metrics import (diversity_over_modalities, gfid_per_modality, ms_ssim, ms_ssim_scales,
                                           pairwise_diversity)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def smooth_images(n, side, seed):
    """[n, 3, side, side] in [0, 1]: random coarse patterns, upsampled (natural-image-like structure)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def test_identical_images_have_zero_diversity():
    image = smooth_images(1, 64, 0)
    result = pairwise_diversity(image.repeat(5, 1, 1, 1))
    assert result["pairs"] == 10 and result["diversity"] == pytest.approx(0.0, abs=1e-9)


def test_ms_ssim_matches_torchmetrics_and_diversity_matches_a_pair_loop():
    from skimage.metrics import structural_similarity

    from evaluation.generation_metrics import torchmetrics_ms_ssim

    base = smooth_images(1, 192, 1)
    g = torch.Generator().manual_seed(2)
    # Four images that share structure (so no contrast term is clamped and the libraries agree)
    images = (base + 0.15 * (smooth_images(4, 192, 3) - 0.5) + 0.02 * torch.rand(4, 3, 192, 192, generator=g)).clamp(0, 1)
    assert ms_ssim_scales(192) == 5
    ours = ms_ssim(images[:2], images[2:])
    # torchmetrics pads and crops its Gaussian filter differently: the two agree to ~2e-3, not to the last digit.
    torch.testing.assert_close(ours, torchmetrics_ms_ssim(images[:2], images[2:]), atol=3e-3, rtol=0)
    # pytorch-msssim's building block, single-scale SSIM, is scikit-image's (the project's SSIM convention).
    from pytorch_msssim import ssim as pytorch_ssim

    single = pytorch_ssim(images[:1].double(), images[1:2].double(), data_range=1.0).item()
    expected_ssim = structural_similarity(images[0].double().numpy(), images[1].double().numpy(), channel_axis=0,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert single == pytest.approx(expected_ssim, abs=1e-5)  # its window is float32
    # Independent computation of the paper's definition: every distinct pair, one at a time, with torchmetrics.
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = np.mean([1 - torchmetrics_ms_ssim(images[i:i + 1], images[j:j + 1]).item() for i, j in pairs])
    result = pairwise_diversity(images)
    assert result["pairs"] == 6
    assert result["diversity"] == pytest.approx(expected, abs=3e-3)
    assert result["diversity"] > 0.01  # different images: clearly non-zero


def test_diversity_is_the_mean_over_modalities_and_falls_back_to_fewer_scales():
    same = smooth_images(1, 64, 4).repeat(3, 1, 1, 1)
    different = smooth_images(3, 64, 5)
    result = diversity_over_modalities({"a": same, "b": different})
    assert ms_ssim_scales(64) == 3 and result["per_modality"]["b"]["ms_ssim_scales"] == 3
    assert result["per_modality"]["a"]["diversity"] == pytest.approx(0.0, abs=1e-9)
    assert result["mean"] == pytest.approx(result["per_modality"]["b"]["diversity"] / 2)
    with pytest.raises(ValueError, match="at least 2 images"):
        pairwise_diversity(different[:1])


def test_gfid_through_the_real_inception_path():
    """gFID per modality against a closed form: with 2 images per side each covariance has rank 1,
    Σ1 = u·uᵀ, Σ2 = w·wᵀ (u, w = feature differences / √2), so tr((Σ1·Σ2)^½) = |u·w| and
    FID = |μ1 − μ2|² + |u|² + |w|² − 2·|u·w|. Features are computed here one image at a time."""
    network = build_fid_inception(random_weights=True, seed=0)
    fake = {"x": smooth_images(2, 32, 6), "y": smooth_images(2, 32, 7)}
    real = {"x": smooth_images(2, 32, 8), "y": smooth_images(2, 32, 7)}  # y: the same images on both sides
    result = gfid_per_modality(network, fake, real)
    f1 = np.concatenate([inception_features(network, image[None]).double().numpy() for image in fake["x"]])
    f2 = np.concatenate([inception_features(network, image[None]).double().numpy() for image in real["x"]])
    u, w = (f1[0] - f1[1]) / np.sqrt(2), (f2[0] - f2[1]) / np.sqrt(2)
    expected = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + u @ u + w @ w - 2 * abs(u @ w)
    assert result["per_modality"]["x"] == pytest.approx(expected, rel=1e-4)
    assert result["per_modality"]["x"] > 1e-3
    assert abs(result["per_modality"]["y"]) < 1e-6 * result["per_modality"]["x"]
    assert result["mean"] == pytest.approx(np.mean([result["per_modality"]["x"], result["per_modality"]["y"]]))


def test_synthesis_cli_writes_table3_with_paper_rows_and_flags_random_inception(tmp_path):
    from evaluation import synthesis

    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32)))
                       for _ in range(6)])
    np.savez(tmp_path / "samples.npz", images=images, labels=np.array([0, 0, 0, 1, 1, 1]),
             label_names=np.array(["fundus", "pathology"]), ids=np.zeros((6, 8, 4), np.uint16))
    rows = []
    for i in range(4):
        Image.fromarray(images[i]).save(tmp_path / f"real{i}.png")
        rows.append({"identifier": f"real{i}.png", "caption": "", "modality": "fundus" if i < 2 else "pathology"})
    with open(tmp_path / "real.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["identifier", "caption", "modality"])
        writer.writeheader()
        writer.writerows(rows)
    code = synthesis.main(["--samples", str(tmp_path / "samples.npz"), "--real-csv", str(tmp_path / "real.csv"),
                           "--real-root", str(tmp_path), "--random-inception", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    payload = json.loads((tmp_path / "out" / "synthesis.json").read_text())
    assert any("RANDOMLY INITIALISED INCEPTION" in w for w in payload["warnings"])
    assert [r["modality"] for r in payload["per_modality"]] == ["fundus", "pathology"]
    markdown = (tmp_path / "out" / "synthesis.md").read_text()
    assert "76.78 ± 1.91" in markdown and "0.6883" in markdown and "WARNING" in markdown
    assert (tmp_path / "out" / "synthesis.csv").is_file()


def test_synthesis_cli_bad_samples_file_is_one_line_and_exit_2(tmp_path, capsys):
    from evaluation import synthesis

    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "text.npz").write_text("not an npz")
    for name, says in (("missing.npz", "samples file not found"), ("other.npz", "lacks array(s) ['labels', 'label_names']"),
                       ("text.npz", "not a readable .npz samples file")):
        code = synthesis.main(["--samples", str(tmp_path / name), "--real-folder", str(tmp_path), "--no-fid",
                               "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and says in err, (name, err)
    assert not (tmp_path / "out").exists()


def test_synthesis_cli_missing_real_csv_is_usage_2_and_a_broken_real_image_a_run_failure_1(tmp_path, capsys):
    from evaluation import synthesis

    np.savez(tmp_path / "samples.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.array([0, 0, 1, 1]),
             label_names=np.array(["ct", "fundus"]))
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("identifier,caption,modality\nbroken.png,x,ct\n")
    common = ["--samples", str(tmp_path / "samples.npz"), "--real-root", str(tmp_path), "--no-fid",
              "--out", str(tmp_path / "out"), "--quiet"]
    assert synthesis.main(common + ["--real-csv", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metadata CSV not found" in err
    assert synthesis.main(common + ["--real-csv", str(tmp_path / "bad.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err and "empty" in err
