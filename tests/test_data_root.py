"""Metadata rows must not escape the data root: `..`, absolute paths and symlinks leading out are refused
(by name, before any image is read) unless allow_outside_root / --allow-outside-root opts in."""
import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generation import tokenize_dataset
from generation.token_cache import csv_source, folder_source
from meditok.data import CSVImageDataset, MedicalImageError, read_image, resolve_under_root

PASSWD = "../../../../etc/passwd"


def save_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path, identifiers):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identifier", "caption", "modality"])
        for identifier in identifiers:
            writer.writerow([identifier, "a test image", "fundus"])
    return path


def inside(root, identifier):
    """Independent reference of the rule: does root/identifier resolve (.., symlinks) to root or below?"""
    return (Path(root) / identifier).resolve().is_relative_to(Path(root).resolve())


@pytest.fixture
def tree(tmp_path):
    """tmp/data/root/{good.png, sub/deep.png} inside; tmp/data/elsewhere/x.png outside."""
    root = tmp_path / "data" / "root"
    save_png(root / "good.png", 0)
    save_png(root / "sub" / "deep.png", 1)
    outside = save_png(tmp_path / "data" / "elsewhere" / "x.png", 2)
    return root, outside


def escaping_csv(tmp_path, root, outside):
    rows = ["good.png", "../elsewhere/x.png", str(outside), PASSWD, "sub/deep.png"]
    return write_csv(tmp_path / "meta.csv", rows), rows


def assert_refused_by_name(message, csv_path, root, rows):
    """The error names the CSV, the root, the fix, and exactly the outside rows with their CSV lines."""
    assert str(csv_path) in message and str(root) in message
    assert "--allow-outside-root" in message and "allow_outside_root=True" in message
    outside_rows = [(line, ident) for line, ident in enumerate(rows, start=2) if not inside(root, ident)]
    assert [line for line, _ in outside_rows] == [3, 4, 5]  # the reference agrees with the test's intent
    for line, identifier in outside_rows:
        assert f"line {line}: identifier {identifier!r}" in message
    named = {int(n) for n in re.findall(r"line (\d+): identifier", message)}
    assert named == {line for line, _ in outside_rows}  # rows inside the root are not blamed
    assert "\n" not in message


def test_csv_dataset_refuses_rows_outside_the_root_at_construction(tmp_path, tree):
    root, outside = tree
    csv_path, rows = escaping_csv(tmp_path, root, outside)
    for on_error in ("raise", "skip"):  # a wrong root/CSV, not a bad file: never skipped
        with pytest.raises(MedicalImageError) as caught:
            CSVImageDataset(csv_path, root=root, on_error=on_error)
        assert_refused_by_name(str(caught.value), csv_path, root, rows)


def test_tokenize_dataset_source_refuses_rows_outside_the_root(tmp_path, tree):
    root, outside = tree
    csv_path, rows = escaping_csv(tmp_path, root, outside)
    with pytest.raises(MedicalImageError) as caught:
        csv_source(csv_path, root, 32)
    assert_refused_by_name(str(caught.value), csv_path, root, rows)
    # the command line: the same refusal without the flag, the rows accepted with it
    argv = ["--random-tokenizer", "tiny", "--csv", str(csv_path), "--root", str(root), "--out", str(tmp_path / "c")]
    with pytest.raises(MedicalImageError) as caught:
        tokenize_dataset.build_source(tokenize_dataset.parse_args(argv), 32)
    assert_refused_by_name(str(caught.value), csv_path, root, rows)
    rows_ok = ["good.png", "../elsewhere/x.png", str(outside)]
    write_csv(csv_path, rows_ok)
    source = tokenize_dataset.build_source(tokenize_dataset.parse_args(argv + ["--allow-outside-root"]), 32)
    assert [source.dataset[i]["identifier"] for i in range(3)] == rows_ok


def test_absolute_path_outside_the_root_loads_when_allowed(tmp_path, tree):
    root, outside = tree
    csv_path = write_csv(tmp_path / "meta.csv", ["good.png", str(outside), "../elsewhere/x.png"])
    dataset = CSVImageDataset(csv_path, root=root, allow_outside_root=True)
    expected = read_image(str(outside), "fundus")
    assert torch.equal(dataset[1]["image"], expected)
    assert torch.equal(dataset[2]["image"], expected)
    assert torch.equal(dataset[0]["image"], read_image(str(root / "good.png"), "fundus"))


def test_symlinks_leading_out_of_the_root_are_refused(tmp_path, tree):
    root, outside = tree
    (root / "link.png").symlink_to(outside)  # a file symlink under the root, pointing out
    (root / "linkdir").symlink_to(outside.parent, target_is_directory=True)  # a folder symlink
    (root / "alias.png").symlink_to(root / "sub" / "deep.png")  # pointing inside: fine
    rows = ["good.png", "link.png", "linkdir/x.png", "alias.png"]
    csv_path = write_csv(tmp_path / "meta.csv", rows)
    with pytest.raises(MedicalImageError) as caught:
        CSVImageDataset(csv_path, root=root)
    message = str(caught.value)
    refused = [line for line, ident in enumerate(rows, start=2) if not inside(root, ident)]
    assert refused == [3, 4]
    assert {int(n) for n in re.findall(r"line (\d+): identifier", message)} == set(refused)
    assert str(outside) in message  # where the link leads
    # allowed: all four load, the links giving the outside image
    dataset = CSVImageDataset(csv_path, root=root, allow_outside_root=True)
    assert torch.equal(dataset[1]["image"], read_image(str(outside), "fundus"))
    assert torch.equal(dataset[3]["image"], read_image(str(root / "sub" / "deep.png"), "fundus"))


def test_a_symlink_placed_after_construction_is_refused_at_read_time(tmp_path, tree):
    root, outside = tree
    csv_path = write_csv(tmp_path / "meta.csv", ["good.png"])
    dataset = CSVImageDataset(csv_path, root=root)
    (root / "good.png").unlink()
    (root / "good.png").symlink_to(outside)
    with pytest.raises(MedicalImageError, match=r"'good.png' resolves to .*outside the data root"):
        dataset[0]


def test_rows_inside_the_root_still_load(tmp_path, tree):
    root, _ = tree
    rows = ["good.png", "sub/deep.png", "sub/../good.png", f" {root / 'sub' / 'deep.png'} "]
    csv_path = write_csv(tmp_path / "meta.csv", rows)
    dataset = CSVImageDataset(csv_path, root=root)
    for index, file in enumerate(["good.png", "sub/deep.png", "good.png", "sub/deep.png"]):
        assert torch.equal(dataset[index]["image"], read_image(str(root / file), "fundus"))
    # a root given through a symlink (e.g. datasets -> /mnt/data) is compared resolved too
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    dataset = CSVImageDataset(csv_path, root=tmp_path / "alias")
    assert torch.equal(dataset[1]["image"], read_image(str(root / "sub" / "deep.png"), "fundus"))


def test_without_a_root_paths_are_used_as_written(tmp_path, tree, monkeypatch):
    root, outside = tree
    monkeypatch.chdir(root)
    csv_path = write_csv(tmp_path / "meta.csv", ["good.png", str(outside), "../elsewhere/x.png"])
    dataset = CSVImageDataset(csv_path)
    assert torch.equal(dataset[0]["image"], read_image(str(root / "good.png"), "fundus"))
    assert torch.equal(dataset[1]["image"], read_image(str(outside), "fundus"))
    assert torch.equal(dataset[2]["image"], read_image(str(outside), "fundus"))


def test_the_error_lists_five_rows_and_counts_the_rest(tmp_path, tree):
    root, _ = tree
    rows = [f"../elsewhere/missing{i}.png" for i in range(8)]
    with pytest.raises(MedicalImageError) as caught:
        CSVImageDataset(write_csv(tmp_path / "meta.csv", rows), root=root)
    message = str(caught.value)
    assert "8 row(s)" in message and "and 3 more" in message
    assert re.findall(r"line (\d+): identifier", message) == ["2", "3", "4", "5", "6"]


@pytest.mark.parametrize("identifier", ["good.png", "sub/deep.png", "sub/..", ".", "sub/../../root/good.png",
                                        "..", "../elsewhere/x.png", "sub/../../elsewhere/x.png", PASSWD,
                                        "/etc/passwd", "link.png", "linkdir/x.png", "linkdir/../root/good.png",
                                        "missing/../../x.png"])
def test_resolve_under_root_agrees_with_path_resolve(tree, identifier):
    root, outside = tree
    (root / "link.png").symlink_to(outside)
    (root / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    cache = {}
    for dir_cache in (None, cache, cache):  # with and without (a warm) folder cache
        if inside(root, identifier):
            assert resolve_under_root(root, identifier, dir_cache=dir_cache) == root / identifier
        else:
            with pytest.raises(MedicalImageError, match=re.escape(f"identifier {identifier!r} (meta.csv line 9)")):
                resolve_under_root(root, identifier, source="meta.csv line 9", dir_cache=dir_cache)
    assert resolve_under_root(root, identifier, allow_outside_root=True) == root / identifier
    assert resolve_under_root(None, identifier) == Path(identifier)


def test_folder_source_refuses_symlinks_leading_out(tmp_path, tree):
    _, outside = tree
    folder = tmp_path / "folder"
    save_png(folder / "fundus" / "a.png", 3)
    (folder / "fundus" / "b.png").symlink_to(outside)
    with pytest.raises(MedicalImageError, match=r"'fundus/b.png' \(image folder .*\) resolves to .*outside"):
        folder_source(folder, 32)
    source = folder_source(folder, 32, allow_outside_root=True)
    assert sorted(source.dataset[i]["identifier"] for i in range(len(source))) == ["fundus/a.png", "fundus/b.png"]
    os.unlink(folder / "fundus" / "b.png")
    assert len(folder_source(folder, 32)) == 1
