"""The image-source registry of meditok.data (csv, folder, medmnist, shards): every kind opens a tiny real input
and yields the pixels a direct PIL / numpy read gives; unknown kinds and custom kinds; the tokenize_dataset CLI
on top of it (one-line errors, exit statuses)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from meditok.data import sources
from meditok.data.sources import SOURCES, ImageSource, ImageSourceError, open_source, register_source

IMG = 32
W = 40            # images are IMG × W: the short side needs no resize, the centre crop keeps columns 4..35
CROP = slice((W - IMG) // 2, (W - IMG) // 2 + IMG)
LABELS = ["fundus", "ct_like", "fundus", "pathology"]


def reference(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] or [H, W, 3] → eval_transform(IMG) of it, computed here: [3, IMG, IMG] in [-1, 1]."""
    rgb = np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels
    values = rgb.astype(np.float64) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(values[:, CROP].transpose(2, 0, 1).copy()).float()


def png_reference(path) -> torch.Tensor:
    with Image.open(path) as image:
        return reference(np.asarray(image.convert("RGB")))


def assert_pixels(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == (3, IMG, IMG) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def write_pngs(folder, names):
    """Random RGB PNGs of IMG × W at the given relative paths."""
    rng = np.random.default_rng(0)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (IMG, W, 3), dtype=np.uint8)).save(path)


def write_csv(folder):
    names = [f"img{i}.png" for i in range(len(LABELS))]
    write_pngs(folder, names)
    path = folder / "meta.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identifier", "caption", "modality"])
        writer.writerows([name, f"image {i}", label] for i, (name, label) in enumerate(zip(names, LABELS)))
    return path, names


def test_the_registry_holds_the_four_kinds():
    assert {"csv", "folder", "medmnist", "shards"} <= set(SOURCES)
    assert SOURCES["csv"] is sources.csv_source and SOURCES["shards"] is sources.shards_source


def test_csv_source_gives_the_pixels_labels_and_captions_of_its_rows(tmp_path):
    csv_path, names = write_csv(tmp_path)
    source = open_source("csv", csv_path=csv_path, root=tmp_path, img_size=IMG)
    assert isinstance(source, ImageSource) and not source.iterable
    assert len(source) == len(LABELS) and source.labels == LABELS and source.modalities == LABELS
    assert source.description == {"kind": "csv", "csv": str(csv_path), "root": str(tmp_path),
                                  "label_column": "modality", "rows": len(LABELS)}
    for i, name in enumerate(names):
        item = source.dataset[i]
        assert_pixels(item["image"], png_reference(tmp_path / name))
        assert (item["caption"], item["identifier"], item["modality"]) == (f"image {i}", name, LABELS[i])
    by_caption = open_source("csv", csv_path=csv_path, root=tmp_path, img_size=IMG, label_column="caption")
    assert by_caption.labels == [f"image {i}" for i in range(len(LABELS))] and by_caption.modalities == LABELS


def test_folder_source_reads_label_sub_folders_in_sorted_order(tmp_path):
    folder = tmp_path / "images"
    names = ["pathology/b.png", "fundus/nested/a.png", "fundus/c.png", "ct_like/z.png"]
    write_pngs(folder, names)
    (folder / "loose.png").write_bytes((folder / names[0]).read_bytes())   # not in a label folder: skipped
    (folder / "fundus" / "notes.txt").write_text("not an image")           # not an image: skipped
    source = open_source("folder", folder=folder, img_size=IMG)
    expected = sorted(names)
    assert [source.dataset[i]["identifier"] for i in range(len(source))] == expected
    assert source.labels == [name.split("/")[0] for name in expected] == source.modalities
    assert source.description == {"kind": "folder", "folder": str(folder), "rows": len(names)}
    for i, name in enumerate(expected):
        assert_pixels(source.dataset[i]["image"], png_reference(folder / name))
        assert source.dataset[i]["modality"] == name.split("/")[0]
    with pytest.raises(ImageSourceError, match=str(tmp_path / "missing")):
        open_source("folder", folder=tmp_path / "missing", img_size=IMG)


def test_medmnist_source_reads_gray_and_rgb_npz_arrays_labelled_by_subset(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, IMG, W), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, IMG, W, 3), dtype=np.uint8)
    np.savez(tmp_path / "pneumoniamnist_32.npz", train_images=gray, train_labels=np.zeros((3, 1)))
    np.savez(tmp_path / "bloodmnist.npz", train_images=rgb, val_images=rgb[:1])
    files = [tmp_path / "pneumoniamnist_32.npz", tmp_path / "bloodmnist.npz"]
    source = open_source("medmnist", npz_files=files, split="train", img_size=IMG)
    assert source.labels == ["pneumoniamnist"] * 3 + ["bloodmnist"] * 2
    assert source.description == {"kind": "medmnist", "files": [str(f) for f in files], "split": "train", "rows": 5}
    expected = [reference(p) for p in gray] + [reference(p) for p in rgb]
    for i, pixels in enumerate(expected):
        assert_pixels(source.dataset[i]["image"], pixels)
    assert [source.dataset[i]["identifier"] for i in (0, 2, 3, 4)] == [
        "pneumoniamnist:0", "pneumoniamnist:2", "bloodmnist:0", "bloodmnist:1"]
    with pytest.raises(ImageSourceError, match="val_images"):
        open_source("medmnist", npz_files=files, split="val", img_size=IMG)


def test_shards_source_streams_the_images_of_the_csv_it_was_written_from(tmp_path):
    from meditok.data import write_shards

    csv_path, names = write_csv(tmp_path)
    write_shards(csv_path, tmp_path / "shards", root=tmp_path, shard_size=3)
    source = open_source("shards", shards=str(tmp_path / "shards"), img_size=IMG)
    assert source.iterable and source.labels == LABELS
    assert source.description == {"kind": "shards", "shards": str(tmp_path / "shards"), "rows": len(LABELS)}
    items = list(source.dataset)
    assert [item["identifier"] for item in items] == names
    for item, name in zip(items, names):
        assert_pixels(item["image"], png_reference(tmp_path / name))


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ImageSourceError) as error:
        open_source("dicomdir", folder="x", img_size=IMG)
    assert "'dicomdir'" in str(error.value)
    for kind in ("csv", "folder", "medmnist", "shards"):
        assert kind in str(error.value)


def test_a_registered_source_is_opened_by_name(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))   # registrations end with the test

    @register_source("constant")
    def constant_source(value: float, count: int, img_size: int) -> ImageSource:
        items = [{"image": torch.full((3, img_size, img_size), value), "caption": "", "identifier": f"c{i}",
                  "modality": "none"} for i in range(count)]
        return ImageSource(items, ["none"] * count, ["none"] * count, {"kind": "constant", "value": value})

    source = open_source("constant", value=0.5, count=2, img_size=IMG)
    assert len(source) == 2 and torch.equal(source.dataset[1]["image"], torch.full((3, IMG, IMG), 0.5))
    assert sources.SOURCES["constant"] is constant_source
    with pytest.raises(ImageSourceError, match="constant"):   # listed among the known kinds
        open_source("nothing")
    with pytest.raises(ValueError, match="already registered"):
        register_source("csv")(constant_source)


def test_token_cache_keeps_its_source_names_and_error_type(tmp_path):
    from generation.token_cache import TokenCacheError, folder_source

    with pytest.raises(TokenCacheError, match="image folder not found"):
        folder_source(tmp_path / "missing", IMG)


def test_tokenize_dataset_reports_bad_input_in_one_line_with_status_2(tmp_path, capsys):
    from generation import tokenize_dataset

    status = tokenize_dataset.main(["--checkpoint", str(tmp_path / "no_such_weights.pth"), "--folder",
                                    str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("error: ") and "\n" not in error and "no_such_weights" in error
    assert tokenize_dataset.exit_status(ImageSourceError("x")) == 2
    assert tokenize_dataset.exit_status(OSError(28, "No space left on device")) == 1
    assert tokenize_dataset.exit_status(RuntimeError("a bug")) is None
