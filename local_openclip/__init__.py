"""Frozen BiomedCLIP teachers for MedITok training, loaded by open_clip from a local folder (or a Hub id).

====================================================  ==========================================================
``load_vision_teacher(source=None, device="cpu")``    → ``VisionTeacher``: [B,3,H,W] in [-1,1] → [B, 768] features
``load_text_teacher(source=None, device="cpu")``      → ``TextTeacher``: ids [B,256] → [B, 512]; ``.tokenize``
``load_tokenizer(source=None)``                       → callable ``str | list[str]`` → LongTensor [B, 256]
``make_tiny_biomedclip(out_dir)``                     writes a tiny random model in the same folder layout
====================================================  ==========================================================

``source``: ``None``/``""`` = ``external/biomedclip``, ``"tiny"`` = ``external/tiny/biomedclip``, a folder,
``local-dir:<folder>`` or ``hf-hub:<repo>``. Default locations are in :mod:`local_openclip.constants`.
A thin layer over open_clip/transformers/timm; ``open_clip`` itself is imported only when a model is built.
"""
from .constants import (BIOMEDCLIP_HUB_ID, BIOMEDCLIP_LOCAL_DIR, DINO_HUB_ID, DINO_PATH, LPIPS_VGG_PATH,
                        RANDOM_WEIGHTS, TINY_DIR, default_location, tiny_location)
from .teachers import (TextTeacher, VisionTeacher, load_text_teacher, load_tokenizer, load_vision_teacher,
                       resolve_biomedclip_source)
from .tiny import make_tiny_biomedclip

__all__ = [
    "BIOMEDCLIP_HUB_ID", "BIOMEDCLIP_LOCAL_DIR", "DINO_HUB_ID", "DINO_PATH", "LPIPS_VGG_PATH", "RANDOM_WEIGHTS",
    "TINY_DIR", "default_location", "tiny_location", "TextTeacher", "VisionTeacher", "load_text_teacher",
    "load_tokenizer", "load_vision_teacher", "resolve_biomedclip_source", "make_tiny_biomedclip",
]
