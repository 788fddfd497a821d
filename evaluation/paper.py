"""The MedITok paper's reported figures (docs/method.md §4) and the modality names of its Table 1.

Only numbers printed in the paper are here; nothing is derived or guessed.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

PAPER = "MedITok (Ma et al., arXiv 2505.19225)"

# Table 1, MedITok (f=16): rFID per modality, in the paper's column order.
TABLE1_MODALITIES = ("CT", "Dermo", "Endo", "Fundus", "MRI", "Patho", "US", "X-ray")
TABLE1_MEDITOK_RFID: Dict[str, float] = {
    "CT": 7.88, "Dermo": 22.27, "Endo": 10.66, "Fundus": 14.39, "MRI": 6.32, "Patho": 46.54, "US": 17.64,
    "X-ray": 6.55,
}
# The paper's "avg" is the mean over its 8 modalities (e.g. rFID (7.88 + ... + 6.55) / 8 = 16.53).
TABLE1_MEDITOK_AVERAGE = {"rfid": 16.53, "psnr": 31.74, "ssim": 88.25}

# Table 2: linear probe on MedMNIST v2 (224-px images resized to 256), average over five datasets.
TABLE2_DATASETS = ("breastmnist", "dermamnist", "pathmnist", "pneumoniamnist", "retinamnist")
TABLE2_MEDITOK_AVERAGE = {"map": 82.27, "auc": 94.07}

# Table S2: 3D evaluation (slice-wise encoding, then aggregation).
TABLE_S2_MEDITOK = {"rfid": 4.94, "psnr": 33.56, "ssim": 89.54, "map": 84.00, "auc": 97.71}

# Lower-case labels with every non-alphanumeric character removed ('X-ray' → 'xray').
_SYNONYMS = {
    "CT": ("ct", "computedtomography", "cta", "cect"),
    "Dermo": ("dermo", "derm", "dermoscopy", "dermatoscopy", "dermatology", "dermoscopic", "skin", "skinlesion"),
    "Endo": ("endo", "endoscopy", "endoscopic", "colonoscopy", "gastroscopy", "capsuleendoscopy"),
    "Fundus": ("fundus", "fundoscopy", "retina", "retinal", "cfp", "colorfundus", "colourfundus", "fundusphotography"),
    "MRI": ("mri", "mr", "magneticresonance", "magneticresonanceimaging", "t1", "t2", "flair"),
    "Patho": ("patho", "path", "pathology", "histopathology", "histology", "wsi", "he", "ihc"),
    "US": ("us", "ultrasound", "ultrasonography", "sonography", "echo", "echocardiography"),
    "X-ray": ("xray", "cxr", "radiograph", "radiography", "chestxray", "dx", "cr"),
}
_TO_TABLE1 = {synonym: name for name, synonyms in _SYNONYMS.items() for synonym in synonyms}


def canonical_label(label: str) -> str:
    """'X-Ray ' → 'xray': lower case, only letters and digits."""
    return re.sub(r"[^0-9a-z]", "", str(label).lower())


def table1_modality(label: Optional[str]) -> Optional[str]:
    """The paper's Table 1 column for a modality label ('cxr' → 'X-ray', 'pathology' → 'Patho'), or None."""
    if label is None:
        return None
    return _TO_TABLE1.get(canonical_label(label))


def modality_synonyms() -> Dict[str, tuple]:
    """Table 1 column → accepted labels (after :func:`canonical_label`), for documentation."""
    return dict(_SYNONYMS)
