#!/usr/bin/env python
"""Regenerate the example image set (datasets/examples) and its metadata (datasets/meta).

Every image is made from a real medical image shipped inside an installed package (pydicom's test
files, nibabel's test data, scikit-image's data folder), so nothing is downloaded. The output is
deterministic: fixed sources, crops and resampling, PNGs written with fixed settings and no
metadata chunks, CSVs with fixed line endings. Running it again reproduces the committed files
byte for byte with the same Pillow/zlib (tests/test_data_examples.py checks this).

Identifiers in the CSVs are relative to the examples folder, so use it as the dataset root:

    python scripts/data/make_examples.py
    python -c "from meditok.data import CSVImageDataset as D; \\
               print(len(D('datasets/meta/examples_train.csv', root='datasets/examples')))"
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

# Runnable from a checkout without installing the package.

from meditok.data import (
    ImageQualityThresholds,
    image_rejection_reasons,
    iter_volume_slices,
    read_ct_hu,
    read_image,
    read_volume,
    rgb_proxy,
)
from meditok.data.packaged import block_mean, collapse_gray
from meditok.data.slicing import CT_HU_CLIP, ct_png_values, save_png, signed_to_uint8

REPO_ROOT = Path(__file__).resolve().parents[2]
CSV_COLUMNS = ("identifier", "caption", "modality", "source")
# Level 9: the set lives in git, so smaller files are worth the slower write.
PNG_COMPRESS_LEVEL = 9


def pydicom_file(name: str) -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def nibabel_file(name: str) -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data" / name


def skimage_file(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


# ----- pixel helpers (all deterministic, integer-exact where possible)


def upsample(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Upsample uint8 pixels by an integer factor with Pillow's bicubic filter."""
    image = Image.fromarray(pixels)
    return np.asarray(
        image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC)
    )


def box_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 pixels to (width, height) by area averaging (Pillow BOX)."""
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


def to_uint8(image_signed) -> np.ndarray:
    """read_image output [3, H, W] in [-1, 1] -> uint8 [H, W] if gray, else [H, W, 3]."""
    return collapse_gray(signed_to_uint8(image_signed.permute(1, 2, 0).numpy()))


def ct_pixels(
    source: Path, factor: int = 1, crop: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """CT DICOM -> uint16 HU + 1024, clipped to the paper's [-1000, 2000], optionally cropped
    (top, left, height, width) and block-averaged."""
    hu = read_ct_hu(source)[0].numpy().astype(np.float64)
    if crop is not None:
        top, left, height, width = crop
        hu = hu[top : top + height, left : left + width]
    hu = np.clip(hu, *CT_HU_CLIP)
    if factor > 1:
        hu = block_mean(hu, factor)
    return ct_png_values(hu)


def dicom_pixels(
    source: Path, frame: int | None = None, factor: int = 1, upsample_by: int = 1
) -> np.ndarray:
    pixels = to_uint8(read_image(source, frame=frame))
    if factor > 1:
        pixels = np.round(block_mean(pixels, factor)).astype(np.uint8)
    if upsample_by > 1:
        pixels = upsample(pixels, upsample_by)
    return pixels


def mri_volume_slice(source: Path, axis: int, index: int, upsample_by: int) -> np.ndarray:
    """One slice of the paper's MRI slicing (every 5th slice, kept by the MRI rule), upsampled."""
    for candidate in iter_volume_slices(read_volume(source), "mri"):
        if (candidate.axis, candidate.index) == (axis, index):
            if not candidate.kept:
                raise RuntimeError(f"{source} slice {axis}/{index} is dropped: {candidate.reasons}")
            return upsample(signed_to_uint8(candidate.pixels), upsample_by)
    raise RuntimeError(f"{source}: no slice {index} on axis {axis} in the every-5th-slice grid")


def rgb_file(source: Path) -> np.ndarray:
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)


def crop(pixels: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(pixels[top : top + height, left : left + width])


# ----- the set


@dataclass(frozen=True)
class Example:
    identifier: str  # relative to the examples root
    modality: str
    split: str  # 'train' or 'val'
    source: str  # package and file it was made from
    caption: str
    make: Callable[[], np.ndarray]  # uint8 [H, W] / [H, W, 3], or uint16 [H, W] for CT


def examples() -> list[Example]:
    retina = lambda: rgb_file(skimage_file("retina.jpg"))  # noqa: E731
    ihc = lambda: rgb_file(skimage_file("ihc.png"))  # noqa: E731
    cell = lambda: rgb_file(skimage_file("cell.png"))  # noqa: E731
    return [
        # CT: 16-bit PNG holding HU + 1024 (docs/method.md §3)
        Example(
            "ct/thorax_vertebra.png",
            "ct",
            "train",
            "pydicom CT_small.dcm",
            "Axial contrast-enhanced CT of the thorax centred on a thoracic vertebra, showing the "
            "vertebral body, spinal canal, paraspinal muscles and the descending aorta.",
            lambda: ct_pixels(pydicom_file("CT_small.dcm")),
        ),
        Example(
            "ct/head_vertex.png",
            "ct",
            "train",
            "pydicom 693_J2KI.dcm",
            "Axial non-contrast head CT near the vertex, showing the skull vault around the "
            "cerebral hemispheres; lossy JPEG 2000 compression blurs the brain.",
            lambda: ct_pixels(pydicom_file("693_J2KI.dcm"), factor=2),
        ),
        Example(
            "ct/head_skull_base.png",
            "ct",
            "train",
            "pydicom J2K_pixelrep_mismatch.dcm",
            "Axial non-contrast head CT at the skull base, showing the temporal lobes, the "
            "posterior fossa, the mastoid air cells and the paranasal sinuses.",
            lambda: ct_pixels(pydicom_file("J2K_pixelrep_mismatch.dcm"), factor=2),
        ),
        Example(
            "ct/head_posterior_fossa_crop.png",
            "ct",
            "val",
            "pydicom J2K_pixelrep_mismatch.dcm",
            "Close-up of an axial head CT showing the cerebellar hemispheres, the occipital bone "
            "and the mastoid air cells.",
            lambda: ct_pixels(pydicom_file("J2K_pixelrep_mismatch.dcm"), crop=(224, 128, 256, 256)),
        ),
        Example(
            "ct/head_vertex_crop.png",
            "ct",
            "train",
            "pydicom 693_J2KI.dcm",
            "Close-up of an axial head CT showing the skull vault and the brain surface.",
            lambda: ct_pixels(pydicom_file("693_J2KI.dcm"), crop=(96, 128, 256, 256)),
        ),
        # MRI: 8-bit PNG after the paper's percentile normalisation
        Example(
            "mri/abdomen_liver_lesion.png",
            "mri",
            "train",
            "pydicom examples_overlay.dcm",
            "Axial contrast-enhanced MRI of the upper abdomen showing a liver lesion, both "
            "kidneys and the aorta.",
            lambda: dicom_pixels(pydicom_file("examples_overlay.dcm"), factor=2),
        ),
        Example(
            "mri/mr_small.png",
            "mri",
            "train",
            "pydicom MR_small.dcm",
            "Low-resolution MRI slice (a downsized NEMA test image), upsampled twofold.",
            lambda: dicom_pixels(pydicom_file("MR_small.dcm"), upsample_by=2),
        ),
        Example(
            "mri/brain_sagittal_015.png",
            "mri",
            "train",
            "nibabel anatomical.nii",
            "Sagittal structural brain MRI (2 mm voxels) through the corpus callosum, upsampled "
            "sixfold.",
            lambda: mri_volume_slice(nibabel_file("anatomical.nii"), 0, 15, 6),
        ),
        Example(
            "mri/brain_coronal_020.png",
            "mri",
            "train",
            "nibabel anatomical.nii",
            "Coronal structural brain MRI (2 mm voxels) through the lateral ventricles, "
            "upsampled sixfold.",
            lambda: mri_volume_slice(nibabel_file("anatomical.nii"), 1, 20, 6),
        ),
        Example(
            "mri/brain_axial_015.png",
            "mri",
            "train",
            "nibabel anatomical.nii",
            "Axial structural brain MRI (2 mm voxels) through the lateral ventricles and the "
            "thalami, upsampled sixfold.",
            lambda: mri_volume_slice(nibabel_file("anatomical.nii"), 2, 15, 6),
        ),
        Example(
            "mri/brain_epi_axial_010.png",
            "mri",
            "train",
            "nibabel example4d.nii.gz",
            "Axial echo-planar functional MRI of the brain, upsampled twofold.",
            lambda: mri_volume_slice(nibabel_file("example4d.nii.gz"), 2, 10, 2),
        ),
        Example(
            "mri/brain_epi_axial_015.png",
            "mri",
            "val",
            "nibabel example4d.nii.gz",
            "Axial echo-planar functional MRI of the brain at a higher level, upsampled twofold.",
            lambda: mri_volume_slice(nibabel_file("example4d.nii.gz"), 2, 15, 2),
        ),
        # Ultrasound
        Example(
            "ultrasound/lymph_node_doppler.png",
            "ultrasound",
            "train",
            "pydicom examples_rgb_color.dcm",
            "Power Doppler ultrasound of a lymph node showing its hilar vascular pattern.",
            lambda: dicom_pixels(pydicom_file("examples_rgb_color.dcm")),
        ),
        Example(
            "ultrasound/echocardiogram_frame00.png",
            "ultrasound",
            "train",
            "pydicom examples_ybr_color.dcm",
            "Transthoracic echocardiogram showing the cardiac chambers, first frame of a cine "
            "loop.",
            lambda: dicom_pixels(pydicom_file("examples_ybr_color.dcm"), frame=0),
        ),
        Example(
            "ultrasound/echocardiogram_frame10.png",
            "ultrasound",
            "train",
            "pydicom examples_ybr_color.dcm",
            "Transthoracic echocardiogram showing the cardiac chambers, a later frame of the cine "
            "loop.",
            lambda: dicom_pixels(pydicom_file("examples_ybr_color.dcm"), frame=10),
        ),
        Example(
            "ultrasound/echocardiogram_frame20.png",
            "ultrasound",
            "val",
            "pydicom examples_ybr_color.dcm",
            "Transthoracic echocardiogram showing the cardiac chambers, a late frame of the cine "
            "loop.",
            lambda: dicom_pixels(pydicom_file("examples_ybr_color.dcm"), frame=20),
        ),
        # Nuclear medicine
        Example(
            "nuclear_medicine/whole_body_bone_scan.png",
            "nuclear_medicine",
            "train",
            "pydicom JPEG2000.dcm",
            "Whole-body bone scintigraphy, anterior view.",
            lambda: dicom_pixels(pydicom_file("JPEG2000.dcm"), factor=2),
        ),
        # Fundus
        Example(
            "fundus/retina.png",
            "fundus",
            "train",
            "scikit-image retina.jpg",
            "Colour fundus photograph of a normal left eye showing the optic disc, the macula and "
            "the retinal vessels.",
            lambda: box_resize(retina(), (256, 256)),
        ),
        Example(
            "fundus/retina_optic_disc.png",
            "fundus",
            "train",
            "scikit-image retina.jpg",
            "Close-up colour fundus photograph of the optic disc with the emerging retinal "
            "arteries and veins.",
            lambda: box_resize(crop(retina(), 344, 0, 512, 512), (256, 256)),
        ),
        Example(
            "fundus/retina_macula.png",
            "fundus",
            "train",
            "scikit-image retina.jpg",
            "Close-up colour fundus photograph of the macula and fovea.",
            lambda: box_resize(crop(retina(), 436, 439, 512, 512), (256, 256)),
        ),
        Example(
            "fundus/retina_inferior_arcade.png",
            "fundus",
            "val",
            "scikit-image retina.jpg",
            "Close-up colour fundus photograph of retinal arteries and veins of the inferior "
            "vascular arcade.",
            lambda: box_resize(crop(retina(), 800, 300, 512, 512), (256, 256)),
        ),
        # Pathology (immunohistochemistry)
        Example(
            "pathology/ihc_colon.png",
            "pathology",
            "train",
            "scikit-image ihc.png",
            "Immunohistochemistry of colonic glands: FHL2 protein stained brown with DAB, "
            "nuclei counterstained blue with hematoxylin.",
            lambda: box_resize(ihc(), (256, 256)),
        ),
        Example(
            "pathology/ihc_colon_crop_top_left.png",
            "pathology",
            "train",
            "scikit-image ihc.png",
            "High-magnification immunohistochemistry of colonic glands with brown DAB staining "
            "of FHL2 and hematoxylin counterstain.",
            lambda: crop(ihc(), 0, 0, 256, 256),
        ),
        Example(
            "pathology/ihc_colon_crop_bottom_right.png",
            "pathology",
            "val",
            "scikit-image ihc.png",
            "High-magnification immunohistochemistry of a colonic gland cut in cross-section, "
            "DAB-positive epithelium and hematoxylin-stained stroma.",
            lambda: crop(ihc(), 256, 256, 256, 256),
        ),
        # Microscopy (quantitative phase imaging)
        Example(
            "microscopy/cell_phase.png",
            "microscopy",
            "train",
            "scikit-image cell.png",
            "Quantitative phase microscopy image of a single cell floating in saline.",
            lambda: np.round(block_mean(rgb_file(skimage_file("cell.png")), 2)).astype(np.uint8),
        ),
        Example(
            "microscopy/cell_phase_crop_cell.png",
            "microscopy",
            "train",
            "scikit-image cell.png",
            "Close-up quantitative phase microscopy of a cell with high phase values against the "
            "background.",
            lambda: crop(cell(), 260, 294, 256, 256),
        ),
        Example(
            "microscopy/cell_phase_crop_edge.png",
            "microscopy",
            "val",
            "scikit-image cell.png",
            "Quantitative phase microscopy of the upper edge of a cell and the banded background.",
            lambda: crop(cell(), 100, 196, 256, 256),
        ),
    ]


def check_example(path: Path, example: Example, thresholds: ImageQualityThresholds) -> list[str]:
    """Read the written file back as training would and run the 2D QC on it."""
    image = read_image(path, example.modality)
    return image_rejection_reasons(rgb_proxy(image), thresholds)


def write_csv(path: Path, rows: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for example in rows:
            writer.writerow([example.identifier, example.caption, example.modality, example.source])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Rebuild the small example set of real medical images (CT, MRI, ultrasound, nuclear "
            "medicine, fundus, pathology, microscopy) from files shipped inside pydicom, nibabel "
            "and scikit-image, with train/val metadata CSVs. Deterministic: re-running it "
            "reproduces the files byte for byte."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", "--out-dir", dest="out_dir",
        type=Path,
        default=REPO_ROOT / "datasets" / "examples",
        help="folder for the images; CSV identifiers are relative to it",
    )
    parser.add_argument(
        "--meta-dir",
        type=Path,
        default=REPO_ROOT / "datasets" / "meta",
        help="folder for examples_train.csv and examples_val.csv",
    )
    parser.add_argument(
        "--skip-check",
        action="store_true",
        help="do not read every image back through read_image + 2D QC",
    )
    args = parser.parse_args(argv)

    items = examples()
    thresholds = ImageQualityThresholds()
    failures = []
    total_bytes = 0
    for example in tqdm(items, desc="examples", unit="img"):
        path = args.out_dir / example.identifier
        save_png(path, example.make(), PNG_COMPRESS_LEVEL)
        total_bytes += path.stat().st_size
        if not args.skip_check:
            reasons = check_example(path, example, thresholds)
            if reasons:
                failures.append(f"{example.identifier}: {'; '.join(reasons)}")
    for split in ("train", "val"):
        write_csv(args.meta_dir / f"examples_{split}.csv", [e for e in items if e.split == split])

    by_modality = Counter(e.modality for e in items)
    by_split = Counter(e.split for e in items)
    print(f"wrote {len(items)} images ({total_bytes / 1e6:.2f} MB) to {args.out_dir}")
    print("  by modality: " + ", ".join(f"{m} {n}" for m, n in sorted(by_modality.items())))
    print(
        f"  metadata: {args.meta_dir}/examples_train.csv ({by_split['train']} rows), "
        f"examples_val.csv ({by_split['val']} rows); use root={args.out_dir}"
    )
    if failures:
        print("QUALITY CONTROL FAILED for:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if not args.skip_check:
        print("  every image read back through read_image and passed the 2D quality control")
    return 0


if __name__ == "__main__":
    sys.exit(main())
