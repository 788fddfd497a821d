"""Linear probe: the training loop on synthetic features, MedMNIST .npz reading, features, and the CLI end to end."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import meditok
from evaluation import linear_probe
from evaluation.linear_probe import (FeatureTable, iter_npz_rows, medmnist_dataset, predict, probe_averages,
                                     train_linear_probe)
from evaluation.metrics import classification_metrics
from evaluation.tokenizer import encode_for_evaluation, grid_features_from_ids


def _sample(centres, n, rng):
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(size=(n, centres.shape[1])), labels


def test_probe_reaches_high_auc_on_a_separable_task():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 32))           # class means ~ 8 noise standard deviations apart
    x_train, y_train = _sample(centres, 1000, rng)
    x_test, y_test = _sample(centres, 1000, rng)
    result = train_linear_probe(FeatureTable.from_dense(x_train), y_train, FeatureTable.from_dense(x_test), y_test,
                                task="multi-class", num_classes=2, epochs=5, progress=False)
    assert result.best_auc["auc"] >= 95.0
    assert result.best_map["map"] >= 95.0
    assert len(result.history) == 5 and result.feature_dim == 32


def test_probe_on_shuffled_labels_is_at_chance():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 32))
    x_train, y_train = _sample(centres, 1000, rng)
    x_test, y_test = _sample(centres, 2000, rng)
    result = train_linear_probe(FeatureTable.from_dense(x_train), rng.permutation(y_train),
                                FeatureTable.from_dense(x_test), rng.permutation(y_test),
                                task="multi-class", num_classes=2, epochs=5, progress=False)
    # Peak over epochs of a chance-level AUC: 50 ± a few standard errors (≈ 1.3 points at n = 2000).
    assert abs(result.best_auc["auc"] - 50.0) < 6.0
    assert abs(result.final["auc"] - 50.0) < 6.0


def test_probe_handles_multi_label_and_multi_class_tasks():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1200, 24))
    weights = rng.normal(size=(24, 4))
    multi_label = (x @ weights > 0).astype(int)                       # 4 linearly separable labels
    result = train_linear_probe(FeatureTable.from_dense(x[:800]), multi_label[:800], FeatureTable.from_dense(x[800:]),
                                multi_label[800:], task="multi-label", num_classes=4, epochs=5, progress=False,
                                val=FeatureTable.from_dense(x[800:1000]), val_labels=multi_label[800:1000])
    assert result.best_auc["auc"] > 90.0
    assert result.val_selected is not None and set(result.val_selected) >= {"epoch", "auc", "map"}
    centres = rng.normal(size=(5, 24)) * 2
    x_train, y_train = _sample(centres, 1000, rng)
    x_test, y_test = _sample(centres, 500, rng)
    result = train_linear_probe(FeatureTable.from_dense(x_train), y_train, FeatureTable.from_dense(x_test), y_test,
                                task="multi-class", num_classes=5, epochs=5, progress=False)
    assert result.best_auc["auc"] > 95.0
    assert result.best_auc["classes_scored"] == 5


def test_confident_probe_predictions_are_scored_without_ties():
    """A probe so sure of itself that float32 softmax gives 1.0 to every test image: ranks must survive."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    features = np.array([[1.0, 0.0], [1.25, 0.0], [1.5, 0.0], [2.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0], [20.0, 1.0]]))
        layer.bias.zero_()
    logits64 = features.astype(np.float64) @ layer.weight.detach().double().numpy().T   # margins 20, 25, 30, 40
    assert (torch.tensor(logits64, dtype=torch.float32).softmax(dim=1)[:, 1] == 1.0).all()
    scores = predict(layer, FeatureTable.from_dense(features), "multi-class")
    assert scores.dtype == np.float64
    metrics = classification_metrics("multi-class", labels, scores)
    assert metrics["auc"] == pytest.approx(100 * sklearn_metrics.roc_auc_score(labels, logits64[:, 1] - logits64[:, 0]))
    assert metrics["auc"] == pytest.approx(100.0) and metrics["map"] == pytest.approx(100.0)
    # Multi-label: the logits are the scores (sigmoid saturates at 1.0 in float32 too).
    multi = predict(layer, FeatureTable.from_dense(features), "multi-label")
    np.testing.assert_allclose(multi, logits64)


def test_average_row_covers_the_papers_datasets_only():
    def row(name, task, classes, best_map, best_auc, two_class=float("nan")):
        return {"dataset": name, "features": "grid", "task": task, "num_classes": classes, "best_map": best_map,
                "best_auc": best_auc, "best_map_two_class": two_class}

    rows = [row("breastmnist_224", "multi-class", 2, 80.0, 90.0, 70.0), row("dermamnist", "multi-class", 7, 60.0, 92.0),
            row("chestmnist_224", "multi-label", 14, 20.0, 70.0), row("csv", "multi-class", 3, 10.0, 50.0)]
    table2, other = probe_averages(rows, ["grid"])
    assert table2["grid"]["names"] == ["breastmnist_224", "dermamnist"] and table2["grid"]["datasets"] == 2
    assert table2["grid"]["map"] == pytest.approx((80.0 + 60.0) / 2)
    assert table2["grid"]["auc"] == pytest.approx((90.0 + 92.0) / 2)
    assert table2["grid"]["map_two_class"] == pytest.approx((70.0 + 60.0) / 2)    # binary: the two-class mean
    assert other["grid"]["names"] == ["chestmnist_224", "csv"]
    assert other["grid"]["auc"] == pytest.approx((70.0 + 50.0) / 2)
    table2, other = probe_averages(rows[:2], ["grid"])
    assert other == {}


def test_grid_features_from_cached_ids_equal_the_quantised_grid(tiny_model, images):
    with torch.no_grad():
        expected = tiny_model.encode_image_vq(images).flatten(1)
    encoded = encode_for_evaluation(tiny_model, images, reconstruct=False)
    assert torch.equal(encoded["grid"], expected)
    ids16 = encoded["ids"].to(torch.int16)                     # the cache stores int16 ids
    table = FeatureTable.from_ids(ids16.numpy(), tiny_model.quantizer.normalized_codebooks())
    assert torch.allclose(table.rows(torch.arange(2)), expected)
    assert torch.allclose(grid_features_from_ids(ids16, tiny_model.quantizer.normalized_codebooks()), expected)
    with torch.no_grad():
        reconstruction = tiny_model.img_to_reconstructed_img(images)
    assert torch.allclose(encode_for_evaluation(tiny_model, images)["reconstruction"], reconstruction)


def _write_medmnist(path, n_train=48, n_test=32, size=28, multi_label=False, seed=0):
    """A MedMNIST-format file: uint8 images, labels [N, 1] (or [N, C]); class 1 images are brighter."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 16), ("test", n_test)):
        if multi_label:
            labels = rng.integers(0, 2, (n, 3))
            brightness = labels[:, 0]
        else:
            labels = rng.integers(0, 2, (n, 1))
            brightness = labels[:, 0]
        images = rng.integers(0, 80, (n, size, size)) + 150 * brightness[:, None, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_npz_rows_stream_like_numpy_load(tmp_path):
    arrays = _write_medmnist(tmp_path / "toymnist.npz")
    chunks = list(iter_npz_rows(tmp_path / "toymnist.npz", "train_images", chunk=10))
    assert [len(c) for c in chunks] == [10, 10, 10, 10, 8]
    np.testing.assert_array_equal(np.concatenate(chunks), arrays["train_images"])
    limited = list(iter_npz_rows(tmp_path / "toymnist.npz", "train_images", chunk=10, limit=15))
    np.testing.assert_array_equal(np.concatenate(limited), arrays["train_images"][:15])
    dataset = medmnist_dataset(tmp_path / "toymnist.npz")
    assert dataset.task == "multi-class" and dataset.num_classes == 2 and dataset.splits == ["train", "val", "test"]
    assert any("224" in note for note in dataset.notes)           # 28-px files are flagged
    _write_medmnist(tmp_path / "chesty.npz", multi_label=True)
    assert medmnist_dataset(tmp_path / "chesty.npz").task == "multi-label"
    with pytest.raises(linear_probe.ProbeDataError, match="not found"):
        medmnist_dataset(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return str(meditok.save_meditok(meditok.build_meditok("tiny"), tmp_path_factory.mktemp("ckpt") / "tok"))


def test_cli_end_to_end_on_npz_and_csv_with_cache(tmp_path, tiny_checkpoint, capsys):
    _write_medmnist(tmp_path / "toymnist.npz")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--checkpoint", tiny_checkpoint, "--npz", str(tmp_path / "toymnist.npz"), "--img-size", "64",
            "--epochs", "3", "--cache-dir", str(cache), "--out", str(out), "--quiet", "--device", "cpu",
            "--train-csv", "datasets/meta/examples_train.csv", "--test-csv", "datasets/meta/examples_val.csv",
            "--root", "datasets/examples", "--label-column", "modality", "--name", "examples_modality"]
    assert linear_probe.main(args) == 0
    result = json.loads((out / "linear_probe.json").read_text())
    rows = {(r["dataset"], r["features"]): r for r in result["results"]}
    assert set(rows) == {("toymnist", "grid"), ("toymnist", "pooled"),
                         ("examples_modality", "grid"), ("examples_modality", "pooled")}
    assert rows[("toymnist", "grid")]["feature_dim"] == 16 * 64            # 64 px → 4×4 tokens × 64 channels
    assert rows[("examples_modality", "grid")]["num_classes"] == 7         # modality names numbered
    assert all(0 <= r["best_auc"] <= 100 for r in rows.values())
    # toymnist is binary: mAP of the positive class, the two-class mean beside it; 7 classes: no two-class value.
    assert 0 <= rows[("toymnist", "grid")]["best_map_two_class"] <= 100
    assert rows[("examples_modality", "grid")]["best_map_two_class"] is None
    # Neither task is one of Table 2's: the paper-comparable average is empty, the others are averaged apart.
    assert result["average"]["grid"]["datasets"] == 0 and result["average"]["grid"]["map"] is None
    assert result["average_other_datasets"]["grid"]["names"] == ["toymnist", "examples_modality"]
    assert not any("RANDOM" in w for w in result["warnings"])             # a checkpoint, not random weights
    # 1-6 example images per modality: flagged; toymnist (>= 10 per class in train and test) is not.
    assert all(w.startswith("examples_modality: few") for w in result["warnings"]) and result["warnings"]
    markdown = (out / "linear_probe.md").read_text()
    assert "paper MedITok" in markdown and "82.27" in markdown
    assert "not in the paper's average" in markdown and "positive class" in markdown
    history = pd.read_csv(out / "linear_probe_history.csv")
    assert len(history) == 4 * 3 and {"test_auc", "test_map", "val_auc"} <= set(history.columns)
    assert len(pd.read_csv(out / "linear_probe.csv")) == 4
    assert all(s.startswith("computed") for s in result["datasets"][0]["features"].values())
    # Second run: features come from the cache, and give the same probe.
    assert linear_probe.main(args) == 0
    again = json.loads((out / "linear_probe.json").read_text())
    assert all(s.startswith("cache") for d in again["datasets"] for s in d["features"].values())
    assert again["results"][0]["best_auc"] == pytest.approx(result["results"][0]["best_auc"])
    assert "linear probe" in capsys.readouterr().out.lower()


def test_cli_explains_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        linear_probe.main(["--preset", "tiny", "--random-weights"])
    assert "--medmnist-root" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="breastmnist"):
        linear_probe.main(["--preset", "tiny", "--random-weights", "--medmnist-root", str(tmp_path)])


def test_help_names_the_protocol(capsys):
    with pytest.raises(SystemExit) as exit_info:
        linear_probe.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--medmnist-root", "--npz", "--train-csv", "--features", "--cache-dir", "--random-weights"):
        assert flag in text
    assert "lr 1e-4" in text and "batch 128" in text


def _write_image_task(folder, n_per_class=4, seed=0, suffix=".png"):
    """train.csv / test.csv listing 64-px grey images: class 1 brighter than class 0."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = []
        for i in range(2 * n_per_class):
            label = i % 2
            pixels = rng.integers(0, 80, (64, 64)) + 150 * label
            name = f"{split}_{i}{suffix}"
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
            rows.append({"identifier": name, "label": label})
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return ["--train-csv", str(folder / "train.csv"), "--test-csv", str(folder / "test.csv"), "--root", str(folder),
            "--label-column", "label", "--num-workers", "0", "--epochs", "2", "--quiet", "--device", "cpu"]


def test_cache_is_keyed_by_image_contents(tmp_path, tiny_checkpoint):
    """Overwriting every image (CSV unchanged, even with size and mtime kept) used to reuse the stale cache."""
    import os

    from PIL import Image

    data_args = _write_image_task(tmp_path / "images", suffix=".bmp")     # BMP: same size whatever the pixels
    args = ["--checkpoint", tiny_checkpoint, "--img-size", "64", "--features", "pooled",
            "--out", str(tmp_path / "out")] + data_args
    assert linear_probe.main(args) == 0
    first = json.loads((tmp_path / "out" / "linear_probe.json").read_text())
    assert all(s.startswith("computed, cached") for s in first["datasets"][0]["features"].values())
    assert linear_probe.main(args) == 0                                     # unchanged data: from the cache
    again = json.loads((tmp_path / "out" / "linear_probe.json").read_text())
    assert all(s.startswith("cache") for s in again["datasets"][0]["features"].values())
    # Overwrite each image with a grey one of exactly the same byte size and modification time.
    for image in sorted((tmp_path / "images").glob("*.bmp")):
        stat = image.stat()
        Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(image)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    assert linear_probe.main(args) == 0
    grey = json.loads((tmp_path / "out" / "linear_probe.json").read_text())
    assert all(s.startswith("computed, cached") for s in grey["datasets"][0]["features"].values())
    assert grey["results"][0]["best_auc"] == pytest.approx(50.0)           # identical images: chance
    assert first["results"][0]["best_auc"] != pytest.approx(50.0)
    assert linear_probe.main(args + ["--no-cache"]) == 0
    uncached = json.loads((tmp_path / "out" / "linear_probe.json").read_text())
    assert all(s == "computed (not cached)" for s in uncached["datasets"][0]["features"].values())


def test_defaults_model_size_cache_under_out_and_small_sample_warning(tmp_path, tiny_checkpoint, monkeypatch):
    data_args = _write_image_task(tmp_path / "images", n_per_class=3)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere" / "probe"
    assert linear_probe.main(["--checkpoint", tiny_checkpoint, "--features", "pooled", "--out", str(out)]
                             + data_args) == 0
    result = json.loads((out / "linear_probe.json").read_text())
    assert result["settings"]["img_size"] == meditok.load_meditok(tiny_checkpoint).config.img_size   # not 256
    assert sorted(p.suffix for p in (out / "cache").iterdir()) == [".json", ".json", ".npz", ".npz"]
    assert not (tmp_path / "outputs").exists()                              # nothing written under ./outputs
    small = [w for w in result["warnings"] if "few" in w]
    assert small == ["csv: few train images per class (0: 3, 1: 3; fewer than 10): its mAP/AUC are noise",
                     "csv: few test images per class (0: 3, 1: 3; fewer than 10): its mAP/AUC are noise"]
    assert "few train images per class" in (out / "linear_probe.md").read_text()


def test_nan_images_are_refused_by_the_probe(tmp_path):
    import nibabel as nib

    data_args = _write_image_task(tmp_path / "images", n_per_class=2)
    volume = np.random.default_rng(0).normal(0, 300, (32, 32, 3)).astype(np.float32)
    volume[4:8, 4:8, :] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "images" / "nan_ct.nii.gz"))
    table = pd.read_csv(tmp_path / "images" / "test.csv")
    table.loc[0, "identifier"] = "nan_ct.nii.gz"
    table.to_csv(tmp_path / "images" / "test.csv", index=False)
    with pytest.raises(SystemExit, match=r"nan_ct.nii.gz: 16 of 1024 pixel values are not finite"):
        linear_probe.main(["--preset", "tiny", "--random-weights", "--img-size", "64", "--features", "pooled",
                           "--no-cache", "--out", str(tmp_path / "out")] + data_args)
    assert not (tmp_path / "out" / "linear_probe.json").exists()
