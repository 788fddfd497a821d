"""Quality rules at their boundaries, and the data CLIs end to end (run in-process: fast)."""

from __future__ import annotations

import csv
import filecmp
import runpy
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from meditok.data import (
    CTSliceThresholds,
    ct_slice_rejection_reasons,
    image_rejection_reasons,
    iter_volume_slices,
    mri_slice_rejection_reasons,
    read_ct_hu,
    read_image,
    read_volume,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "data"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"


def run_script(script: Path, *args: str) -> int:
    """Run a CLI as `python script args` would, in this process."""
    saved = sys.argv
    sys.argv = [str(script), *map(str, args)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def has_reason(reasons: list[str], kind: str) -> bool:
    return any(r.startswith(kind) for r in reasons)


# ----- 2D QC: each rule just below and just above its boundary


def four_level_image(top: int, size=(128, 128)) -> np.ndarray:
    """Equal quarters of 0, top/3, 2top/3, top: range = top, std ~ 0.4 top, 4 distinct values."""
    levels = np.array([0, top // 3, 2 * top // 3, top], dtype=np.uint8)
    return np.repeat(levels, size[0] * size[1] // 4).reshape(size)


def test_qc_intensity_range_boundary():
    below, at = four_level_image(49), four_level_image(50)
    assert np.ptp(below) == 49 and np.ptp(at) == 50
    assert image_rejection_reasons(below) == ["intensity range 49 < 50"]
    assert image_rejection_reasons(at) == []


def test_qc_short_side_boundary():
    noise = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    assert image_rejection_reasons(noise[:127]) == ["short side 127 px < 128"]
    assert image_rejection_reasons(noise[:128]) == []
    assert has_reason(image_rejection_reasons(noise[:, :127]), "short side")


@pytest.mark.parametrize("outliers, expected_below", [(327, True), (328, False)])
def test_qc_std_boundary(outliers, expected_below):
    values = np.full(128 * 128, 100, dtype=np.uint8)
    values[:outliers] = 150
    values[outliers : 2 * outliers] = 50
    values[-2:] = (99, 101)  # > 3 distinct values, so only the std rule is in play
    std = values.std()
    assert (std < 10) == expected_below and abs(std - 10) < 0.02  # really at the boundary
    reasons = image_rejection_reasons(values.reshape(128, 128))
    assert reasons == ([f"std {std:.3f} < 10"] if expected_below else [])


def test_qc_distinct_values_boundary():
    three = np.repeat(np.array([0, 128, 255], dtype=np.uint8), 128 * 129).reshape(129, 384)[:, :384]
    assert np.unique(three).size == 3
    assert image_rejection_reasons(three) == ["3 distinct value(s) <= 3"]
    four = three.copy()
    four[0, 0] = 64
    assert image_rejection_reasons(four) == []


# ----- 3D -> 2D slice rules


def slice_with(values: dict[float, int], size: int = 100) -> np.ndarray:
    """A 10x10 slice holding `count` pixels of each HU value."""
    pixels = np.concatenate(
        [np.full(count, value, dtype=np.float64) for value, count in values.items()]
    )
    assert pixels.size == size
    return pixels.reshape(10, 10)


def test_ct_background_ratio_boundary():
    assert not has_reason(
        ct_slice_rejection_reasons(slice_with({-1000: 60, 40: 40})), "background ratio"
    )
    assert has_reason(
        ct_slice_rejection_reasons(slice_with({-1000: 61, 40: 39})), "background ratio"
    )


def test_ct_body_ratio_boundary():
    # -300 HU counts as body (>=), -301 does not
    assert not has_reason(
        ct_slice_rejection_reasons(slice_with({-500: 90, -300: 10})), "body ratio"
    )
    assert has_reason(
        ct_slice_rejection_reasons(slice_with({-500: 90, -300: 9, -301: 1})), "body ratio"
    )


def test_ct_std_boundary():
    for spread, dropped in ((99.9, False), (100.0, True), (100.1, True)):
        hu = slice_with({-spread: 50, spread: 50})
        assert abs(hu.std() - spread) < 1e-9
        assert has_reason(ct_slice_rejection_reasons(hu), "HU std") == dropped
    # the rule can be relaxed for real scans (see CTSliceThresholds)
    relaxed = CTSliceThresholds(max_std=np.inf)
    assert ct_slice_rejection_reasons(slice_with({-1000: 50, 40: 50}), relaxed) == []


def test_mri_mean_and_std_boundaries():
    eps = 1e-6
    flat = np.zeros((10, 10))
    spread = np.where(np.arange(100).reshape(10, 10) % 2 == 0, -1.0, 1.0)  # mean 0, std 1
    assert has_reason(
        mri_slice_rejection_reasons(spread * 0.5 + (-0.9)), "mean"
    )  # mean exactly -0.9
    assert has_reason(mri_slice_rejection_reasons(spread * 0.5 + (-0.9 - eps)), "mean")
    assert not has_reason(mri_slice_rejection_reasons(spread * 0.5 + (-0.9 + eps)), "mean")
    assert has_reason(mri_slice_rejection_reasons(flat + spread * (0.2 - eps)), "std")
    assert not has_reason(mri_slice_rejection_reasons(flat + spread * (0.2 + eps)), "std")


# ----- CLIs


@pytest.mark.parametrize(
    "script", ["make_examples.py", "slice_volumes.py", "quality_control.py", "csv_to_shards.py"]
)
def test_every_cli_has_help(script, capsys):
    assert run_script(SCRIPTS / script, "--help") == 0
    text = capsys.readouterr().out
    assert "usage:" in text and len(text) > 400


def test_loader_benchmark_has_help(capsys):
    assert run_script(REPO / "benchmarks" / "loader_benchmark.py", "--help") == 0
    assert "images/s" in capsys.readouterr().out


def test_quality_control_cli_writes_kept_and_dropped_with_reasons(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (130, 140), dtype=np.uint8)).save(tmp_path / "good.png")
    Image.fromarray(rng.integers(0, 256, (100, 140), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.full((130, 140), 9, dtype=np.uint8)).save(tmp_path / "flat.png")
    table = tmp_path / "meta.csv"
    table.write_text(
        "identifier,caption,modality,extra\n"
        "good.png,a,mri,1\nsmall.png,b,mri,2\nflat.png,c,xray,3\nmissing.png,d,mri,4\ngood.png,e,ct,5\n"
    )
    assert (
        run_script(
            SCRIPTS / "quality_control.py", "--csv", table, "--root", tmp_path, "--workers", 1
        )
        == 0
    )
    kept, dropped = csv_rows(tmp_path / "meta_kept.csv"), csv_rows(tmp_path / "meta_dropped.csv")
    assert [r["caption"] for r in kept] == ["a"] and kept[0]["extra"] == "1"
    reasons = {r["caption"]: r["reason"] for r in dropped}
    assert reasons["b"] == "short side 100 px < 128"
    assert reasons["c"].startswith("intensity range 0 < 50")
    assert reasons["d"] == "unreadable: file not found"
    assert reasons["e"].startswith("unreadable: modality 'ct' needs Hounsfield units")
    assert "checked 5 images: 1 kept, 4 dropped" in capsys.readouterr().out


def test_slice_volumes_cli_mri_follows_the_rules(tmp_path, capsys):
    source = NIBABEL_FILES / "anatomical.nii"
    assert (
        run_script(
            SCRIPTS / "slice_volumes.py",
            "--inputs",
            source,
            "--modality",
            "mri",
            "--out-dir",
            tmp_path,
            "--dropped-csv",
            tmp_path / "dropped.csv",
        )
        == 0
    )
    rows, dropped = csv_rows(tmp_path / "slices.csv"), csv_rows(tmp_path / "dropped.csv")
    expected = [s for s in iter_volume_slices(read_volume(source), "mri")]
    assert len(rows) == sum(s.kept for s in expected) and len(dropped) == sum(
        not s.kept for s in expected
    )
    assert len(rows) + len(dropped) == sum(-(-n // 5) for n in nib.load(source).shape)
    for row in rows:
        assert int(row["slice_index"]) % 5 == 0 and row["modality"] == "mri"
        image = np.asarray(Image.open(tmp_path / row["identifier"]))
        assert image.dtype == np.uint8 and image.ndim == 2
    assert "kept" in capsys.readouterr().out


def test_slice_volumes_cli_ct_writes_hu_pngs(tmp_path):
    # A synthetic CT: a water cylinder (0 HU) with a bone rod in air, stored as NIfTI.
    x, y = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    plane = np.where((x - 15) ** 2 + (y - 15) ** 2 < 12**2, 0.0, -1000.0)
    plane[14:17, 14:17] = 1500.0
    volume = np.repeat(plane[:, :, None], 12, axis=2).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "phantom.nii.gz")
    out = tmp_path / "slices"
    assert (
        run_script(
            SCRIPTS / "slice_volumes.py",
            "--inputs",
            tmp_path / "phantom.nii.gz",
            "--modality",
            "ct",
            "--out-dir",
            out,
            "--ct-max-std",
            "inf",
        )
        == 0
    )
    rows = csv_rows(out / "slices.csv")
    axial = [r for r in rows if r["axis"] == "axial"]
    assert [int(r["slice_index"]) for r in axial] == [0, 5, 10]
    for row in axial:
        hu = read_ct_hu(out / row["identifier"])[0].numpy()
        np.testing.assert_array_equal(np.sort(hu.ravel()), np.sort(plane.ravel()))
        assert Image.open(out / row["identifier"]).mode.startswith("I")  # 16-bit
    # with the paper's std rule as printed, this phantom (HU std ~ 500) keeps nothing
    assert (
        run_script(
            SCRIPTS / "slice_volumes.py",
            "--inputs",
            tmp_path / "phantom.nii.gz",
            "--modality",
            "ct",
            "--out-dir",
            tmp_path / "strict",
        )
        == 0
    )
    assert csv_rows(tmp_path / "strict" / "slices.csv") == []


def test_example_set_regenerates_byte_for_byte(tmp_path):
    committed_images, committed_meta = REPO / "datasets" / "examples", REPO / "datasets" / "meta"
    assert (
        run_script(
            SCRIPTS / "make_examples.py",
            "--out-dir",
            tmp_path / "examples",
            "--meta-dir",
            tmp_path / "meta",
            "--skip-check",
        )
        == 0
    )
    # datasets/examples holds exactly the generated images; datasets/meta also holds other bundles' tables
    # (the VQA examples of interpretation/), so there every generated file must be committed, not the reverse
    for committed, fresh, exact in (
        (committed_images, tmp_path / "examples", True),
        (committed_meta, tmp_path / "meta", False),
    ):
        names = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
        present = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
        if exact:
            assert names == present
        else:
            assert set(names) <= set(present) and names
        _, mismatch, errors = filecmp.cmpfiles(
            committed, fresh, [str(n) for n in names], shallow=False
        )
        assert mismatch == [] and errors == [], (
            f"differs from the committed files: {mismatch + errors}. If the generator changed on "
            "purpose (or Pillow/zlib did), run scripts/data/make_examples.py and commit the result."
        )


def test_example_set_is_varied_and_readable():
    rows = csv_rows(REPO / "datasets" / "meta" / "examples_train.csv")
    rows += csv_rows(REPO / "datasets" / "meta" / "examples_val.csv")
    modalities = {r["modality"] for r in rows}
    assert {"ct", "mri", "fundus", "pathology", "microscopy", "ultrasound"} <= modalities
    assert 20 <= len(rows) <= 40 and all(r["caption"] for r in rows)
    for row in rows:
        image = read_image(REPO / "datasets" / "examples" / row["identifier"], row["modality"])
        assert min(image.shape[1:]) >= 128


# ----- what a new user meets: output names, the documented example, empty input


def test_slice_volumes_names_folders_after_the_file_stem_without_clashes(tmp_path):
    """Folders are named after the volume's file (not its whole path); a second volume with the same stem gets
    `_2`; the CSV's `source` keeps each full path."""
    copy = tmp_path / "other" / "anatomical.nii"
    copy.parent.mkdir()
    copy.write_bytes((NIBABEL_FILES / "anatomical.nii").read_bytes())
    out = tmp_path / "slices"
    sources = [str(NIBABEL_FILES / "anatomical.nii"), str(copy)]
    assert run_script(SCRIPTS / "slice_volumes.py", "--inputs", *sources, "--modality", "mri", "--out-dir", out,
                      "--step", "10") == 0
    rows = csv_rows(out / "slices.csv")
    folder_of = {r["source"]: r["identifier"].split("/")[0] for r in rows}
    assert folder_of == {sources[0]: "anatomical", sources[1]: "anatomical_2"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["anatomical", "anatomical_2"]
    for row in rows:
        assert (out / row["identifier"]).is_file()


def test_quality_control_help_example_writes_nothing_into_datasets(tmp_path, capsys, monkeypatch):
    """The example printed by --help, run as given from a checkout, leaves the tracked datasets/meta/ alone."""
    assert run_script(SCRIPTS / "quality_control.py", "--help") == 0
    example = capsys.readouterr().out.split("example:", 1)[1].strip().split("\n\n")[0].replace("\\\n", " ")
    argv = example.split("quality_control.py", 1)[1].split()
    # a checkout whose datasets/meta is a copy (so a write there would show) and whose images are the real ones
    (tmp_path / "datasets" / "meta").mkdir(parents=True)
    for name in ("examples_train.csv",):
        (tmp_path / "datasets" / "meta" / name).write_bytes((REPO / "datasets" / "meta" / name).read_bytes())
    (tmp_path / "datasets" / "examples").symlink_to(REPO / "datasets" / "examples")
    monkeypatch.chdir(tmp_path)
    argv[argv.index("--workers") + 1] = "1"
    assert run_script(SCRIPTS / "quality_control.py", *argv) == 0
    assert sorted(p.name for p in (tmp_path / "datasets" / "meta").iterdir()) == ["examples_train.csv"]
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("*.csv"))
    assert written == ["outputs/qc/examples_train_dropped.csv", "outputs/qc/examples_train_kept.csv"]
    assert len(csv_rows(tmp_path / written[1])) + len(csv_rows(tmp_path / written[0])) == len(
        csv_rows(REPO / "datasets" / "meta" / "examples_train.csv"))


def _exit_message(script: Path, *args) -> str:
    with pytest.raises(SystemExit) as caught:
        saved, sys.argv = sys.argv, [str(script), *map(str, args)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
    assert isinstance(caught.value.code, str), f"exit code {caught.value.code!r}, expected an error message"
    return caught.value.code


def test_csv_to_shards_refuses_an_empty_csv_naming_it(tmp_path):
    header_only = tmp_path / "meta.csv"
    header_only.write_text("identifier,caption,modality\n")
    message = _exit_message(SCRIPTS / "csv_to_shards.py", "--csv", header_only, "--out-dir", tmp_path / "shards")
    assert str(header_only) in message and "no rows" in message and "\n" not in message
    assert not (tmp_path / "shards").exists()
    zero_bytes = tmp_path / "zero.csv"
    zero_bytes.write_text("")
    message = _exit_message(SCRIPTS / "csv_to_shards.py", "--csv", zero_bytes, "--out-dir", tmp_path / "shards")
    assert message.startswith(f"csv_to_shards: {zero_bytes}") and "header row" in message


def test_a_missing_metadata_csv_names_the_flags_users_actually_have(tmp_path):
    from meditok.data import MedicalImageError
    from meditok.data.samples import read_metadata_csv
    with pytest.raises(MedicalImageError) as caught:
        read_metadata_csv(tmp_path / "absent.csv", ["identifier"])
    message = str(caught.value)
    assert str(tmp_path / "absent.csv") in message and "--train-csv" in message
