"""What the token-cache writer and reader share: file names, the format tag, the error type, the tokenizer's
identity and the label vocabulary rule. The folder layout is described in :mod:`generation.token_cache`."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

from meditok.checkpoint import weights_fingerprint as meditok_weights_fingerprint

CACHE_FORMAT = "meditok-token-cache-v1"
IDS_FILE = "ids.npy"
META_FILE = "meta.csv"
MANIFEST_FILE = "manifest.json"
CHUNKS_DIR = "chunks"
PLAN_FILE = "plan.json"
META_COLUMNS = ("row", "label", "label_name", "modality", "caption", "identifier", "augmentation")
PathLike = Union[str, os.PathLike]


class TokenCacheError(ValueError):
    """A token cache that is missing, incomplete, or incompatible; the message names the file and the fix."""


tokenizer_fingerprint = meditok_weights_fingerprint  # the name this package has always used


def short_fingerprint(fingerprint: str) -> str:
    return fingerprint[:16]


def resolve_label_names(labels: Sequence[str], label_names: Optional[Sequence[str]], where: str) -> List[str]:
    """The label vocabulary: ``label_names`` when given (every value must be in it), else the sorted values."""
    if label_names is None:
        return sorted(set(labels))
    unseen = sorted(set(labels) - set(label_names))
    if unseen:
        raise TokenCacheError(f"{where}: label value(s) {unseen} are not in the label names {list(label_names)}; "
                              f"tokenize with the same label column, or build the label list from this data "
                              f"(leave --label-names-from unset)")
    return list(label_names)
