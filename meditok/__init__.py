"""MedITok: a unified visual tokenizer for medical images, as a library.

    import meditok
    model = meditok.load_meditok("weights/meditok_simple_v1.pth")   # or build_meditok("tiny")
    ids = model.img_to_idx(images)        # [B, 3, 256, 256] in [-1, 1] → [B, 8, 256] int64
    recon = model.idx_to_img(ids)         # → [B, 3, 256, 256] in [-1, 1]

``meditok.data`` reads medical images (PNG/JPEG incl. 16-bit, CT HU PNGs, DICOM, NIfTI) exactly as
training does.
"""
from .checkpoint import (
    RELEASED_FILES,
    RELEASED_HUB_REPO,
    CheckpointError,
    atomic_write,
    build_meditok,
    diff_state_dict,
    extract_tokenizer_state_dict,
    load_meditok,
    matching_presets,
    save_meditok,
)
from .config import PRESETS, MedITokConfig, get_config
from .model import MedITok
from .quantizer import MultiCodebookQuantizer, QuantizerOutput

__all__ = [
    "MedITok", "MedITokConfig", "PRESETS", "get_config", "build_meditok", "load_meditok", "save_meditok",
    "atomic_write", "CheckpointError", "diff_state_dict", "matching_presets", "extract_tokenizer_state_dict",
    "MultiCodebookQuantizer", "QuantizerOutput", "RELEASED_FILES", "RELEASED_HUB_REPO",
]
__version__ = "0.1.0"
