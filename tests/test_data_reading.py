"""read_image / read_ct_hu / read_volume on real package-shipped files and on bad input.

References are computed in the tests from the libraries themselves (pydicom's pixel_array with
slope and intercept, nibabel's canonical array, Pillow's pixels), never from our own code.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from meditok.data import (
    CT_WINDOWS,
    MedicalImageError,
    ct_window,
    iter_volume_slices,
    read_ct_hu,
    read_image,
    read_volume,
    slice_positions,
    volume_slice,
)
from meditok.data.slicing import ct_png_values, save_png

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"


def signed(values: np.ndarray, full_scale: float) -> np.ndarray:
    """Independent reference for fixed-scale data: value / full_scale -> [-1, 1]."""
    return values.astype(np.float64) / full_scale * 2.0 - 1.0


def robust_minmax(values: np.ndarray) -> np.ndarray:
    """Independent reference for the paper's MRI normalisation (0.5-99.5 percentiles)."""
    low, high = np.percentile(values.astype(np.float64), [0.5, 99.5])
    return np.clip((values - low) / (high - low) * 2.0 - 1.0, -1.0, 1.0)


def assert_gray_image(image: torch.Tensor, expected: np.ndarray, atol: float = 1e-5):
    assert image.dtype == torch.float32 and image.shape == (3, *expected.shape)
    for channel in image:
        np.testing.assert_allclose(channel.numpy(), expected, atol=atol)


# ----- CT and windows


def test_ct_dicom_hu_equals_pydicom_slope_and_intercept(tmp_path):
    source = PYDICOM_FILES / "CT_small.dcm"
    ds = pydicom.dcmread(source)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    np.testing.assert_array_equal(read_ct_hu(source)[0].numpy(), expected.astype(np.float32))

    # CT_small has slope 1: also check a non-trivial slope and intercept.
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1000.5
    rescaled = tmp_path / "rescaled.dcm"
    ds.save_as(rescaled)
    expected = ds.pixel_array.astype(np.float64) * 0.5 - 1000.5
    np.testing.assert_allclose(read_ct_hu(rescaled)[0].numpy(), expected, atol=1e-4)


def test_ct_dicom_is_windowed_with_the_common_window_by_default():
    source = PYDICOM_FILES / "CT_small.dcm"
    ds = pydicom.dcmread(source)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu + 1000.0) / 2000.0 * 2.0 - 1.0, -1.0, 1.0)
    assert_gray_image(read_image(source), expected)  # Modality CT in the header
    lung = np.clip((hu + 1400.0) / 1600.0 * 2.0 - 1.0, -1.0, 1.0)
    assert_gray_image(read_image(source, "ct", window="lung"), lung)
    assert_gray_image(read_image(source, "ct", window=(-1400, 200)), lung)


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_window_maps_edges_to_minus_one_and_one_and_clips(name):
    low, high = CT_WINDOWS[name].low, CT_WINDOWS[name].high
    hu = torch.tensor([low - 500.0, low, (low + high) / 2, high, high + 500.0])
    np.testing.assert_allclose(ct_window(hu, low, high).numpy(), [-1, -1, 0, 1, 1], atol=1e-6)
    # just inside the edges is strictly inside (-1, 1)
    inside = ct_window(torch.tensor([low + 1.0, high - 1.0]), low, high)
    assert -1 < inside[0] < -0.99 and 0.99 < inside[1] < 1


def test_ct_windows_are_the_spec_windows():
    spec = {  # docs/method.md §3
        "full": (-1000, 2000, 0.2),
        "common": (-1000, 1000, 0.3),
        "soft_tissue": (-150, 250, 0.3),
        "lung": (-1400, 200, 0.15),
        "bone": (-500, 1300, 0.05),
    }
    assert {k: tuple(v) for k, v in CT_WINDOWS.items()} == spec


def test_int16_hu_png_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 2001, size=(37, 53)).astype(np.int32)
    hu[0, :2] = (-1000, 2000)  # the clip range edges of docs/method.md §3
    # written by us ...
    save_png(tmp_path / "ours.png", ct_png_values(hu))
    np.testing.assert_array_equal(read_ct_hu(tmp_path / "ours.png")[0].numpy(), hu)
    # ... and by Pillow directly, as another tool would write HU + 1024
    Image.fromarray((hu + 1024).astype(np.uint16)).save(tmp_path / "pillow.png")
    np.testing.assert_array_equal(read_ct_hu(tmp_path / "pillow.png")[0].numpy(), hu)
    expected = np.clip((hu + 150.0) / 400.0 * 2 - 1, -1, 1)
    assert_gray_image(read_image(tmp_path / "pillow.png", "CT", window="soft_tissue"), expected)


# ----- grayscale and colour encodings


def test_monochrome1_is_inverted(tmp_path):
    source = PYDICOM_FILES / "MR_small.dcm"
    ds = pydicom.dcmread(source)
    expected = robust_minmax(ds.pixel_array)
    assert_gray_image(read_image(source), expected)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    assert_gray_image(read_image(tmp_path / "mono1.dcm"), -expected)


def test_16_bit_png_keeps_values_above_255(tmp_path):
    values = np.array([0, 255, 256, 1000, 4095, 40000, 65535], dtype=np.uint16)
    pixels = np.tile(values, (5, 1))
    Image.fromarray(pixels).save(tmp_path / "sixteen.png")
    image = read_image(tmp_path / "sixteen.png")
    assert_gray_image(image, signed(pixels, 65535.0))
    row = image[0, 0]
    assert len(torch.unique(row)) == len(values)  # 255 and 256 stay distinct, nothing clipped
    assert row[-1] == 1.0 and row[2] > row[1]


def test_gray_rgba_and_palette_pngs_become_three_channels(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert_gray_image(read_image(tmp_path / "gray.png"), signed(gray, 255.0))

    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (3, 20, 30)  # alpha ignored, colours as stored
    np.testing.assert_allclose(
        image.permute(1, 2, 0).numpy(), signed(rgba[..., :3], 255.0), atol=1e-6
    )

    colours = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30], [255, 255, 255]], dtype=np.uint8)
    indices = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette(colours.flatten().tolist())
    palette.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    np.testing.assert_allclose(
        image.permute(1, 2, 0).numpy(), signed(colours[indices], 255.0), atol=1e-6
    )


def test_jpeg_matches_pillow_decoding(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=90)
    decoded = np.asarray(Image.open(tmp_path / "photo.jpg"))
    image = read_image(tmp_path / "photo.jpg")
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), signed(decoded, 255.0), atol=1e-6)


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_colour_dicom_is_rgb(name):
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    expected = ds.pixel_array  # pydicom converts YBR to RGB
    image = read_image(PYDICOM_FILES / name)
    assert image.shape == (3, *expected.shape[:2])
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), signed(expected, 255.0), atol=1e-6)


def test_palette_colour_dicom_uses_its_lookup_table():
    from pydicom.pixels import apply_color_lut

    source = PYDICOM_FILES / "examples_palette.dcm"
    ds = pydicom.dcmread(source)
    expected = apply_color_lut(ds.pixel_array, ds)
    lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])  # entries are 8- or 16-bit
    image = read_image(source)
    assert image.shape == (3, *expected.shape[:2])
    np.testing.assert_allclose(
        image.permute(1, 2, 0).numpy(), signed(expected, 2.0**lut_bits - 1), atol=1e-6
    )


def test_multiframe_dicom_frames_are_selectable():
    source = PYDICOM_FILES / "examples_ybr_color.dcm"
    frames = pydicom.dcmread(source).pixel_array
    for index in (0, 7):
        image = read_image(source, frame=index)
        np.testing.assert_allclose(
            image.permute(1, 2, 0).numpy(), signed(frames[index], 255.0), atol=1e-6
        )
    middle = read_image(source)
    expected_middle = signed(frames[len(frames) // 2], 255.0)
    np.testing.assert_allclose(middle.permute(1, 2, 0).numpy(), expected_middle, atol=1e-6)
    with pytest.raises(MedicalImageError, match=f"{source}.*frame 30 out of range"):
        read_image(source, frame=30)


# ----- volumes


def canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata())


def test_nifti_slices_are_selectable_and_radiologically_oriented():
    source = NIBABEL_FILES / "anatomical.nii"
    volume = canonical(source)
    for axis, index in ((2, 12), (0, 5), (1, 30)):
        plane = np.take(volume, index, axis=axis)
        # radiological display: rows top->bottom = decreasing 2nd in-plane axis (A or S),
        # columns left->right = decreasing 1st in-plane axis (patient right first)
        expected = robust_minmax(np.flip(plane, axis=(0, 1)).T)
        assert_gray_image(
            read_image(source, slice_index=index, slice_axis=axis), expected, atol=1e-5
        )
    with pytest.raises(MedicalImageError, match="slice 25 out of range"):
        read_image(source, slice_index=25)


def test_nifti_slicing_takes_every_5th_slice_along_each_axis():
    source = NIBABEL_FILES / "anatomical.nii"
    shape = nib.load(source).shape
    expected_count = sum(math.ceil(n / 5) for n in shape)  # indices 0, 5, 10, ... per axis
    slices = list(iter_volume_slices(read_volume(source), "mri"))
    assert len(slices) == expected_count == len(slice_positions(shape))
    for axis in range(3):
        assert [s.index for s in slices if s.axis == axis] == list(range(0, shape[axis], 5))


def test_dicom_series_folder_is_stacked_along_the_slice_normal(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    stored = ds.pixel_array
    positions = [30.0, 10.0, 20.0]  # written out of order
    for number, z in enumerate(positions):
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = number
        ds.PixelData = (stored + int(z)).astype(stored.dtype).tobytes()
        ds.save_as(tmp_path / f"slice{number}.dcm")
    volume = read_volume(tmp_path)
    assert volume.shape == (128, 128, 3)
    for k, z in enumerate(sorted(positions)):  # inferior to superior
        hu = (stored + int(z)).astype(np.float64) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept
        )
        np.testing.assert_array_equal(volume_slice(volume, 2, k), hu)  # axial = the stored image


# ----- bad input: every case names the file


def test_missing_file(tmp_path):
    with pytest.raises(MedicalImageError, match=f"{tmp_path / 'nope.png'}: file not found"):
        read_image(tmp_path / "nope.png")


def test_empty_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(MedicalImageError, match=f"{tmp_path / 'empty.dcm'}: file is empty"):
        read_image(tmp_path / "empty.dcm")


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match=f"{tmp_path / 'cut.png'}: cannot decode image"):
        read_image(tmp_path / "cut.png")


def test_truncated_dicom_and_nifti(tmp_path):
    with pytest.raises(MedicalImageError, match="MR_truncated.dcm: cannot decode pixel data"):
        read_image(PYDICOM_FILES / "MR_truncated.dcm")
    data = (NIBABEL_FILES / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match=f"{tmp_path / 'cut.nii'}: cannot read NIfTI"):
        read_image(tmp_path / "cut.nii")


def test_non_image(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all\n" * 5)
    with pytest.raises(
        MedicalImageError, match=f"{tmp_path / 'notes.png'}: not a recognised image format"
    ):
        read_image(tmp_path / "notes.png")
    with pytest.raises(MedicalImageError, match="rtplan.dcm: no pixel data"):
        read_image(PYDICOM_FILES / "rtplan.dcm")


def test_dicom_with_undecodable_transfer_syntax():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed, so this file is decodable here")
    source = PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm"
    with pytest.raises(MedicalImageError) as caught:
        read_image(source)
    message = str(caught.value)
    assert str(source) in message and "JPEG-LS Lossless" in message and "pip install" in message


def test_ct_modality_needs_a_16_bit_png(tmp_path):
    Image.fromarray(np.full((16, 16), 100, dtype=np.uint8)).save(tmp_path / "eight_bit.png")
    expected = f"{tmp_path / 'eight_bit.png'}: modality 'ct' needs Hounsfield"
    with pytest.raises(MedicalImageError, match=expected):
        read_image(tmp_path / "eight_bit.png", "ct")
    with pytest.raises(MedicalImageError, match="DICOM Modality is MR"):
        read_image(PYDICOM_FILES / "MR_small.dcm", "ct")


def test_error_survives_pickling_between_processes(tmp_path):
    import pickle

    with pytest.raises(MedicalImageError) as caught:
        read_image(tmp_path / "nope.png")
    clone = pickle.loads(pickle.dumps(caught.value))
    assert str(clone) == str(caught.value) and clone.path == str(tmp_path / "nope.png")


def test_bytes_input_reads_like_the_file(tmp_path):
    source = NIBABEL_FILES / "example4d.nii.gz"
    from_file = read_image(source, frame=1, slice_index=3)
    from_bytes = read_image("shard#scan.nii.gz", frame=1, slice_index=3, data=source.read_bytes())
    torch.testing.assert_close(from_file, from_bytes)
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / "IM0001")  # extension-less DICOM
    torch.testing.assert_close(
        read_image(tmp_path / "IM0001"), read_image(PYDICOM_FILES / "CT_small.dcm")
    )


# ----- non-finite values and decoder failures (never a NaN pixel, always a MedicalImageError)


def write_nonfinite_nifti(path: Path, bad_value: float = np.nan) -> int:
    """A [20, 30, 5] CT volume at -500 HU with a [8, 10, 5] block of `bad_value`; returns the bad count per axial slice."""
    volume = np.full((20, 30, 5), -500.0, dtype=np.float32)
    volume[2:10, 2:12, :] = bad_value
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return 8 * 10


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("modality", ["ct", "mri", None])
def test_nonfinite_nifti_is_refused_on_every_modality_path(tmp_path, bad_value, modality):
    path = tmp_path / "bad_ct.nii.gz"
    per_slice = write_nonfinite_nifti(path, bad_value)
    with pytest.raises(MedicalImageError, match=rf"{path}: {per_slice} of 600 pixel values are not finite"):
        read_image(path, modality)
    with pytest.raises(MedicalImageError, match="not finite"):  # the same bytes from a shard
        read_image("shard#bad_ct.nii.gz", modality, data=path.read_bytes())


def test_nonfinite_values_are_refused_by_read_ct_hu_and_read_volume(tmp_path):
    path = tmp_path / "nan_ct.nii.gz"
    write_nonfinite_nifti(path)
    with pytest.raises(MedicalImageError, match=f"{path}: 80 of 600 pixel values are not finite .80 NaN"):
        read_ct_hu(path)
    with pytest.raises(MedicalImageError, match=f"{path}: 400 of 3000 voxel values are not finite"):
        read_volume(path)
    # A slice without NaN of the same file is still readable: the check is on what is returned.
    volume = np.asarray(nib.load(str(path)).dataobj)
    clean = tmp_path / "clean_slice.nii.gz"
    volume[:, :, 0] = -500.0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(clean))
    assert torch.isfinite(read_image(clean, "ct", slice_index=0)).all()


def test_dicom_with_a_nan_rescale_slope_is_refused(tmp_path):
    import pydicom.config

    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    with pytest.warns(UserWarning):  # pydicom warns that 'NaN' is not a valid DS; such files exist anyway
        ds.RescaleSlope = "NaN"
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.save_as(tmp_path / "nan_slope.dcm")
    finally:
        pydicom.config.settings.writing_validation_mode = mode
    with pytest.raises(MedicalImageError, match="nan_slope.dcm: 16384 of 16384 pixel values are not finite"):
        read_image(tmp_path / "nan_slope.dcm")  # CT by its own header


def test_decompression_bomb_is_a_medical_image_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels > 2 x the limit: Pillow raises
    with pytest.raises(MedicalImageError, match=f"{tmp_path / 'big.png'}: too large to decode safely.*MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "big.png")


def test_any_decoder_error_is_a_medical_image_error(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "odd.png")

    def failing_load(self):
        raise KeyError("a plugin bug on an odd file")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", failing_load)
    with pytest.raises(MedicalImageError, match=r"odd.png: cannot decode image \(KeyError"):
        read_image(tmp_path / "odd.png")
