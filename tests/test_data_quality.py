"""Quality control meets non-finite data: the rules name NaN/Inf, and the QC tool drops such files with the reason."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meditok.data import (
    ct_slice_rejection_reasons,
    image_rejection_reasons,
    mri_slice_rejection_reasons,
    rgb_proxy,
)

REPO = Path(__file__).resolve().parents[1]
QC_SCRIPT = REPO / "scripts" / "data" / "quality_control.py"


def run_script(script: Path, *args) -> int:
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


def write_ct_nifti(path: Path, nan_voxels: bool) -> None:
    """A [160, 160, 3] CT volume with body-like texture (passes 2D QC), optionally with a 10x12 NaN block."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 300.0, (160, 160, 3)).astype(np.float32)
    if nan_voxels:
        volume[20:30, 40:52, :] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))


def test_quality_control_drops_a_nan_ct_nifti_with_the_reason(tmp_path, capsys):
    write_ct_nifti(tmp_path / "clean_ct.nii.gz", nan_voxels=False)
    write_ct_nifti(tmp_path / "nan_ct.nii.gz", nan_voxels=True)
    table = tmp_path / "meta.csv"
    table.write_text("identifier,caption,modality\nclean_ct.nii.gz,a,ct\nnan_ct.nii.gz,b,ct\n")
    assert run_script(QC_SCRIPT, "--csv", table, "--root", tmp_path, "--workers", 1) == 0
    with open(tmp_path / "meta_kept.csv", newline="") as handle:
        kept = list(csv.DictReader(handle))
    with open(tmp_path / "meta_dropped.csv", newline="") as handle:
        dropped = list(csv.DictReader(handle))
    assert [r["identifier"] for r in kept] == ["clean_ct.nii.gz"]
    assert [r["identifier"] for r in dropped] == ["nan_ct.nii.gz"]
    assert dropped[0]["reason"].startswith("unreadable: 120 of 25600 pixel values are not finite (120 NaN")
    assert "1 kept, 1 dropped" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_every_rule_names_non_finite_values(bad):
    proxy = np.random.default_rng(1).integers(0, 256, (130, 130, 3)).astype(np.float64)
    assert image_rejection_reasons(proxy) == []
    proxy[0, :5, 0] = bad
    assert image_rejection_reasons(proxy) == ["5 of 50700 values are not finite (NaN/Inf)"]
    hu = np.full((10, 10), 40.0)
    hu[0, 0] = bad
    assert ct_slice_rejection_reasons(hu) == ["1 of 100 values are not finite (NaN/Inf)"]
    normalised = np.random.default_rng(2).uniform(-1, 1, (10, 10))
    assert mri_slice_rejection_reasons(normalised) == []
    normalised[3, 3] = bad
    assert mri_slice_rejection_reasons(normalised) == ["1 of 100 values are not finite (NaN/Inf)"]


def test_rgb_proxy_refuses_nan_instead_of_casting_it():
    image = torch.zeros(3, 16, 16)
    image[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 768 values are not finite"):
        rgb_proxy(image)
