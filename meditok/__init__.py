"""MedITok: a unified visual tokenizer for medical images, as a library.

    import meditok
    model = meditok.load_meditok("weights/meditok_simple_v1.pth")   # or build_meditok("tiny")
    ids = model.img_to_idx(images)        # [B, 3, 256, 256] in [-1, 1] → [B, 8, 256] int64
    recon = model.idx_to_img(ids)         # → [B, 3, 256, 256] in [-1, 1]

``meditok.data`` reads medical images (PNG/JPEG incl. 16-bit, CT HU PNGs, DICOM, NIfTI) exactly as
training does.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

# The public names are resolved on first use (PEP 562): `import meditok` costs nothing, and timm (with its
# torchvision / torch._dynamo / huggingface_hub imports, most of ten seconds on a cold start) is imported only
# when a model is built. A command-line tool can therefore parse its arguments and report a missing file at once.
_EXPORTS: Dict[str, str] = {
    "RELEASED_FILES": "checkpoint", "RELEASED_HUB_REPO": "checkpoint", "CheckpointError": "checkpoint", "UnsafeCheckpointError": "checkpoint",
    "atomic_write": "checkpoint", "atomic_write_via_path": "checkpoint", "build_meditok": "checkpoint",
    "diff_state_dict": "checkpoint",
    "extract_tokenizer_state_dict": "checkpoint", "load_meditok": "checkpoint", "matching_presets": "checkpoint",
    "save_meditok": "checkpoint", "safe_load": "checkpoint", "weights_fingerprint": "checkpoint",
    "PRESETS": "config", "MedITokConfig": "config", "get_config": "config",
    "MedITok": "model",
    "MultiCodebookQuantizer": "quantizer", "QuantizerOutput": "quantizer",
}

__all__ = [
    "MedITok", "MedITokConfig", "PRESETS", "get_config", "build_meditok", "load_meditok", "save_meditok",
    "atomic_write", "atomic_write_via_path", "safe_load", "weights_fingerprint", "CheckpointError", "UnsafeCheckpointError", "diff_state_dict", "matching_presets", "extract_tokenizer_state_dict",
    "MultiCodebookQuantizer", "QuantizerOutput", "RELEASED_FILES", "RELEASED_HUB_REPO",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meditok' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(__all__ + ["__version__", "data"])


if TYPE_CHECKING:  # static analysers and IDEs see the names as ordinary imports
    from .checkpoint import (RELEASED_FILES, RELEASED_HUB_REPO, CheckpointError, atomic_write,
                             atomic_write_via_path, build_meditok,
                             diff_state_dict, extract_tokenizer_state_dict, load_meditok, matching_presets,
                             safe_load, save_meditok, UnsafeCheckpointError, weights_fingerprint)
    from .config import PRESETS, MedITokConfig, get_config
    from .model import MedITok
    from .quantizer import MultiCodebookQuantizer, QuantizerOutput
