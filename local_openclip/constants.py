"""Where the frozen pretrained networks of training live, in one place.

Every path below is relative to the repository root (not to the working directory), so
``python train.py`` finds ``external/...`` wherever it is started from. Environment variables
override them, most specific first:

=====================  ==========================================  =====================================
variable               overrides                                   default
=====================  ==========================================  =====================================
``MEDITOK_BIOMEDCLIP``  the BiomedCLIP folder (or an ``hf-hub:`` id) ``external/biomedclip``
``MEDITOK_LPIPS_VGG``   the VGG16 weights file of LPIPS              ``external/vgg16.pth``
``MEDITOK_DINO``        the DINOv2 ViT-S/14 folder or file           ``external/dinov2_vits14``
``MEDITOK_TINY``        the folder of tiny random variants           ``external/tiny``
``MEDITOK_EXTERNAL``    the ``external`` folder itself (all above)   ``external``
=====================  ==========================================  =====================================

``external/README.md`` says which file goes where and how to get it.
"""
from __future__ import annotations

import os
from pathlib import Path

#: Repository root: the folder holding ``local_openclip/``.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: BiomedCLIP in open_clip's ``local-dir:`` layout: ``open_clip_config.json``, ``open_clip_pytorch_model.bin``,
#: the PubMedBERT tokenizer files (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json``,
#: ``special_tokens_map.json``) and the PubMedBERT ``config.json`` (architecture only, no weights).
BIOMEDCLIP_LOCAL_DIR = "external/biomedclip"
#: The same model on the Hugging Face Hub, for machines that are online.
BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
#: torchvision's ImageNet VGG16 state dict (``vgg16-397923af.pth``), the backbone lpips normally downloads.
LPIPS_VGG_PATH = "external/vgg16.pth"
#: DINOv2 ViT-S/14 in timm's ``local-dir:`` layout (the Hub repo ``timm/vit_small_patch14_dinov2.lvd142m``:
#: ``config.json`` + ``model.safetensors``). A single weights file (the original
#: ``dinov2_vits14_pretrain.pth`` or a timm state dict) is accepted as well.
DINO_PATH = "external/dinov2_vits14"
#: The same DINOv2 weights on the Hugging Face Hub.
DINO_HUB_ID = "hf-hub:timm/vit_small_patch14_dinov2.lvd142m"
#: Tiny randomly initialised variants (tests, CPU quick start), written by ``scripts/make_tiny_networks.py``.
TINY_DIR = "external/tiny"
#: Names inside ``TINY_DIR``.
TINY_BIOMEDCLIP_NAME = "biomedclip"
TINY_DINO_NAME = "dinov2"
#: The value of ``vgg_path`` that asks for a randomly initialised LPIPS backbone (tests and try-outs only).
RANDOM_WEIGHTS = "random"

_ENV_OVERRIDES = {
    BIOMEDCLIP_LOCAL_DIR: "MEDITOK_BIOMEDCLIP",
    LPIPS_VGG_PATH: "MEDITOK_LPIPS_VGG",
    DINO_PATH: "MEDITOK_DINO",
    TINY_DIR: "MEDITOK_TINY",
}


def default_location(constant: str) -> str:
    """The location a default constant (e.g. ``DINO_PATH``) stands for on this machine.

    Its own environment variable wins; then ``MEDITOK_EXTERNAL`` replaces the leading ``external``;
    relative paths are anchored at the repository root. Returns a string (an absolute path, or a
    ``hf-hub:`` id when an environment variable names one).
    """
    specific = os.environ.get(_ENV_OVERRIDES.get(constant, ""), "")
    if specific:
        return specific if specific.startswith("hf-hub:") else str(Path(specific).expanduser().resolve())
    external_root = os.environ.get("MEDITOK_EXTERNAL", "")
    relative = Path(constant)
    if external_root and relative.parts and relative.parts[0] == "external":
        location = Path(external_root).expanduser() / Path(*relative.parts[1:])
    else:
        location = relative
    if not location.is_absolute():
        location = REPO_ROOT / location
    return str(location)


def tiny_location(name: str) -> str:
    """Absolute path of one tiny variant, e.g. ``tiny_location(TINY_BIOMEDCLIP_NAME)``."""
    return str(Path(default_location(TINY_DIR)) / name)


def resolve_source(source, default_constant: str, tiny_name: str) -> str:
    """How every network ``source`` argument is read: ``None``/``""`` → the default location of
    ``default_constant``, ``"tiny"`` → the tiny variant ``tiny_name``, ``local-dir:PATH`` → ``PATH``;
    ``hf-hub:`` ids and other paths are returned as given (as strings)."""
    if source is None or str(source) == "":
        return default_location(default_constant)
    if str(source) == "tiny":
        return tiny_location(tiny_name)
    source = str(source)
    return source[len("local-dir:"):] if source.startswith("local-dir:") else source
