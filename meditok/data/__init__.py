"""MedITok's medical image data pipeline.

Reading (every format to a [3, H, W] tensor in [-1, 1]), datasets (CSV and webdataset shards), the
registry of image sources (``meditok.data.sources``: CSV, folder, MedMNIST .npz, shards → ``open_source``),
transforms (docs/method.md §3 augmentations), seeding (meditok.seeding), and the quality rules the data tools apply.
Quick use::

    from meditok.data import read_image
    image = read_image("scan.dcm")                      # [3, H, W] in [-1, 1]
    image = read_image("slice.png", modality="ct", window="lung")
"""

from .csv_dataset import CSVImageDataset
from .errors import MedicalImageError
from .paths import resolve_under_root
from .quality import (
    CTSliceThresholds,
    ImageQualityThresholds,
    MRISliceThresholds,
    ct_slice_rejection_reasons,
    image_rejection_reasons,
    mri_slice_rejection_reasons,
    rgb_proxy,
)
from .reading import (
    SUPPORTED_FORMATS,
    normalise_modality,
    read_ct_hu,
    read_image,
    read_volume,
    volume_slice,
)
from ..seeding import make_worker_init_fn, seed_worker, worker_seed
from .shards import ShardedImageDataset, StreamPosition, write_shards
from .sources import SOURCES, ImageSource, ImageSourceError, open_source, register_source
from .slicing import iter_volume_slices, normalise_mri_volume, slice_positions
from .transforms import RandomCTWindow, RandomQuarterTurn, eval_transform, stage1_augmentation
from .windows import (
    CT_PNG_HU_OFFSET,
    CT_WINDOWS,
    DEFAULT_CT_WINDOW,
    CTWindow,
    ct_window,
    window_bounds,
)

__all__ = [
    "CSVImageDataset",
    "CTSliceThresholds",
    "CTWindow",
    "CT_PNG_HU_OFFSET",
    "CT_WINDOWS",
    "DEFAULT_CT_WINDOW",
    "ImageQualityThresholds",
    "ImageSource",
    "ImageSourceError",
    "MRISliceThresholds",
    "MedicalImageError",
    "RandomCTWindow",
    "RandomQuarterTurn",
    "SOURCES",
    "SUPPORTED_FORMATS",
    "ShardedImageDataset",
    "StreamPosition",
    "ct_slice_rejection_reasons",
    "ct_window",
    "eval_transform",
    "image_rejection_reasons",
    "iter_volume_slices",
    "make_worker_init_fn",
    "mri_slice_rejection_reasons",
    "normalise_modality",
    "normalise_mri_volume",
    "open_source",
    "read_ct_hu",
    "read_image",
    "read_volume",
    "register_source",
    "resolve_under_root",
    "rgb_proxy",
    "seed_worker",
    "slice_positions",
    "stage1_augmentation",
    "volume_slice",
    "window_bounds",
    "worker_seed",
    "write_shards",
]
