"""The frozen BiomedCLIP teachers of MedITok training (docs/method.md §2), built by open_clip from a local folder.

Stage 1 aligns the tokenizer with the BiomedCLIP ViT-B/16 image trunk (``load_vision_teacher``), stage 2
with the PubMedBERT text tower (``load_text_teacher``). Both are loaded by
``open_clip.create_model("local-dir:<folder>")`` exactly as open_clip loads any local CLIP, with one
redirection: BiomedCLIP's ``open_clip_config.json`` names its text tower by a Hub id
(``hf_model_name``), which transformers would try to fetch; for a local folder we point it at the folder
itself, which holds that tower's ``config.json`` and tokenizer files. ``hf-hub:`` sources are passed to
open_clip unchanged (online machines only).

``source`` everywhere accepts: ``None`` or ``""`` (the default folder, ``constants.BIOMEDCLIP_LOCAL_DIR``),
``"tiny"`` (the tiny random variant in ``constants.TINY_DIR``), a folder path (optionally prefixed
``local-dir:``) or an ``hf-hub:`` id.

``open_clip`` (5-6 s to import) and ``transformers`` are imported only when a teacher is built.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .constants import BIOMEDCLIP_HUB_ID, BIOMEDCLIP_LOCAL_DIR, TINY_BIOMEDCLIP_NAME, resolve_source

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
#: Checkpoint names open_clip's local-dir loader looks for, in its order of preference.
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
#: The text tower's architecture (a transformers ``BertConfig``), read by ``AutoConfig.from_pretrained``.
TEXT_TOWER_CONFIG = "config.json"
_HOW_TO_GET = ("see external/README.md (BiomedCLIP section) for the download commands, or run "
               "`python scripts/make_tiny_networks.py` and pass source='tiny' for the tiny random variant")


class BiomedCLIPSource:
    """A resolved teacher source: either a local folder (``local_dir``) or a Hub id (``hub_id``)."""

    def __init__(self, local_dir: Optional[Path] = None, hub_id: Optional[str] = None, given: Any = None):
        self.local_dir = local_dir
        self.hub_id = hub_id
        self.given = given

    @property
    def open_clip_name(self) -> str:
        return f"local-dir:{self.local_dir}" if self.local_dir is not None else self.hub_id

    def __repr__(self) -> str:
        return f"BiomedCLIPSource({self.open_clip_name!r}, given={self.given!r})"


def resolve_biomedclip_source(source: Union[str, Path, None] = None) -> BiomedCLIPSource:
    """Turn a user's ``source`` into a checked local folder or a Hub id.

    A local folder must hold ``open_clip_config.json``, exactly one CLIP checkpoint (open_clip loads any
    other ``*.safetensors``/``*.bin``/``*.pth`` it finds as the checkpoint, strictly), the text tower's
    ``config.json`` and its tokenizer files. Anything missing raises ``FileNotFoundError`` naming the file,
    the folder and the fix.
    """
    given = source
    source = resolve_source(source, BIOMEDCLIP_LOCAL_DIR, TINY_BIOMEDCLIP_NAME)
    if source.startswith("hf-hub:"):
        return BiomedCLIPSource(hub_id=source, given=given)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"BiomedCLIP folder not found: {folder} (source={given!r}). It must hold {OPEN_CLIP_CONFIG}, "
            f"open_clip_pytorch_model.bin, the text tower's {TEXT_TOWER_CONFIG} and tokenizer files; "
            f"{_HOW_TO_GET}. Online, source={BIOMEDCLIP_HUB_ID!r} loads it from the Hub.")
    config_path = folder / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing (BiomedCLIP source={given!r}); {_HOW_TO_GET}.")
    checkpoints = sorted(p.name for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))
    if not any(name in CHECKPOINT_NAMES for name in checkpoints):
        raise FileNotFoundError(
            f"No BiomedCLIP weights in {folder}: expected one of {', '.join(CHECKPOINT_NAMES)} "
            f"(found {checkpoints or 'none'}); {_HOW_TO_GET}.")
    if len(checkpoints) > 1:
        # open_clip would silently pick one of them and load it with strict=True.
        raise ValueError(f"{folder} holds several checkpoint files {checkpoints}; keep only "
                         f"open_clip_pytorch_model.bin there (open_clip treats any of them as the CLIP weights).")
    text_config_path = folder / TEXT_TOWER_CONFIG
    if not text_config_path.is_file():
        hub_name = _read_open_clip_config(folder)["model_cfg"]["text_cfg"].get("hf_model_name", "?")
        raise FileNotFoundError(
            f"{text_config_path} is missing: the text tower's architecture (a BERT config.json, no weights) "
            f"must sit beside {OPEN_CLIP_CONFIG} so nothing is fetched from the Hub. Get it from the Hub repo "
            f"{hub_name!r}: `hf download {hub_name} config.json --local-dir {folder}`; see external/README.md.")
    if not (folder / "tokenizer_config.json").is_file() or not any(
            (folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(
            f"Tokenizer files missing in {folder}: need tokenizer_config.json and tokenizer.json or vocab.txt "
            f"(they come with the BiomedCLIP Hub repo); {_HOW_TO_GET}.")
    return BiomedCLIPSource(local_dir=folder.resolve(), given=given)


def _read_open_clip_config(folder: Path) -> Dict[str, Any]:
    with open(folder / OPEN_CLIP_CONFIG, "r", encoding="utf-8") as f:
        config = json.load(f)
    if "model_cfg" not in config:
        raise ValueError(f"{folder / OPEN_CLIP_CONFIG} has no 'model_cfg' entry: not an open_clip model config.")
    return config


def _create_biomedclip(resolved: BiomedCLIPSource, device: Union[str, torch.device] = "cpu",
                       load_weights: bool = True) -> nn.Module:
    """Build the whole BiomedCLIP (``CustomTextCLIP``) through open_clip and load its weights strictly."""
    import open_clip

    overrides: Dict[str, Any] = {}
    if resolved.local_dir is not None:
        text_cfg = dict(_read_open_clip_config(resolved.local_dir)["model_cfg"]["text_cfg"])
        # The config names the text tower by Hub id; the folder holds its config.json and tokenizer instead.
        # hf_model_pretrained=False: the tower's weights come with the CLIP checkpoint, not from transformers.
        text_cfg.update(hf_model_name=str(resolved.local_dir), hf_tokenizer_name=str(resolved.local_dir),
                        hf_model_pretrained=False)
        overrides["text_cfg"] = text_cfg
    model = open_clip.create_model(resolved.open_clip_name, load_weights=load_weights, pretrained_text=False,
                                   device=device, require_pretrained=load_weights, **overrides)
    return model


class _FrozenModule(nn.Module):
    """A module whose parameters never need gradients and which stays in eval mode.

    Frozen teachers must behave the same at every step (dropout off; docs/method.md §2 and the NOTES list keeping the
    teacher in train mode as a bug of the released code), so ``train(True)`` from a parent is ignored.
    """

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "_FrozenModule":
        return super().train(False)


class VisionTeacher(_FrozenModule):
    """Frozen BiomedCLIP image trunk; input the tokenizer's images, output pooled trunk features.

    ``forward(images)``: ``images`` [B, 3, H, W] in [-1, 1] (any size, any float dtype) → features
    [B, output_dim] (768 for BiomedCLIP ViT-B/16), computed without gradients.

    Preprocessing is the teacher's own eval transform, on tensors: map to [0, 1]; resize the shorter side to
    ``image_size`` with the config's interpolation (bicubic for BiomedCLIP) and antialiasing, as PIL does;
    clamp to [0, 1] (PIL saturates at uint8); centre-crop to ``image_size`` (a no-op for square inputs);
    normalise with the config's mean/std (OpenAI CLIP's for BiomedCLIP).

    Features: open_clip builds BiomedCLIP's vision tower as a timm ``vit_base_patch16_224`` trunk with
    ``timm_pool=""`` — which keeps timm's default ``global_pool="token"`` — followed by a linear projection to
    the 512-d CLIP space. We return the trunk's output: the class token after the trunk's final LayerNorm,
    768-d, i.e. BiomedCLIP's own pooled feature just before its CLIP projection (docs/method.md §2: 768-d).
    """

    def __init__(self, trunk: nn.Module, preprocess_cfg: Dict[str, Any], source: str = ""):
        super().__init__()
        self.trunk = trunk
        size = preprocess_cfg["size"]
        self.image_size: Tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation: str = preprocess_cfg.get("interpolation", "bicubic")
        self.resize_mode: str = preprocess_cfg.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode={self.resize_mode!r} in the teacher's preprocess config is not supported "
                             f"(source {source}); supported: 'shortest' (BiomedCLIP) and 'squash'.")
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.output_dim: int = int(trunk.num_features)
        self.source = source
        self._freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, 3, *image_size], normalised as the teacher was trained (float32)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VisionTeacher expects images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        x = (images.float() + 1.0) / 2.0
        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        target_h, target_w = self.image_size
        if self.resize_mode == "squash":
            x = TF.resize(x, [target_h, target_w], interpolation=mode, antialias=True)
        else:
            # open_clip: Resize(shorter side) for a square target, then CenterCrop — torchvision's rule for the
            # longer side (truncating int) is the same for tensors and PIL images.
            short = min(target_h, target_w)
            if x.shape[-2:] != (target_h, target_w):
                x = TF.resize(x, [short], interpolation=mode, antialias=True)
            x = TF.center_crop(x, [target_h, target_w])
        x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → pooled trunk features [B, output_dim] (no gradient)."""
        with torch.no_grad():
            return self.trunk(self.preprocess(images))


class TextTeacher(_FrozenModule):
    """Frozen BiomedCLIP text tower (PubMedBERT + open_clip's MLP projection) and its tokenizer.

    ``tokenize(texts)``: list of captions (or one string) → token ids LongTensor [B, context_length]
    (context 256 for BiomedCLIP; [CLS] … [SEP] then [PAD]=0, truncated).
    ``forward(token_ids)``: [B, L] int64 → projected text features [B, output_dim] (512 for BiomedCLIP; not
    ℓ2-normalised), computed without gradients. The pooled feature is BERT's last-layer [CLS] token
    (``cls_last_hidden_state_pooler``), as BiomedCLIP was trained.
    """

    def __init__(self, text_tower: nn.Module, tokenizer: Any, source: str = ""):
        super().__init__()
        self.text = text_tower
        self.tokenizer = tokenizer
        self.context_length: int = int(tokenizer.context_length)
        self.output_dim: int = int(text_tower.output_dim)
        self.source = source
        self._freeze()

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Captions → LongTensor [B, context_length] (a single string gives B = 1)."""
        return self.tokenizer(list(texts) if not isinstance(texts, str) else texts)

    def trim_padding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Drop the trailing columns that are padding in every row: [B, L] → [B, L'], L' the longest caption's
        length rounded up to a multiple of 8.

        The HF text tower masks padding out of attention and pooling, so the features do not change (the
        tests check equality); the tower's cost falls with L (short captions in a 256-token context: 6× less
        on CPU for MiniLM). Reading the lengths is a host sync on a GPU tensor, so trim before the transfer.
        Towers without a pad id (not HF) are left alone."""
        pad = getattr(getattr(self.text, "config", None), "pad_token_id", None)
        if pad is None or token_ids.ndim != 2 or token_ids.shape[1] == 0:
            return token_ids
        used = (token_ids != pad).any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        # rounded up to a multiple of 8: few distinct shapes (torch.compile, cuDNN/cuBLAS plans), aligned GEMMs
        return token_ids[:, :min(token_ids.shape[1], -(-length // 8) * 8)]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (int64, from ``tokenize``) → text features [B, output_dim] (no gradient)."""
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TextTeacher expects token ids (int64) from .tokenize(), got dtype {token_ids.dtype}")
        if token_ids.device.type == "cpu":  # (a GPU tensor is trimmed by the caller, before its transfer)
            token_ids = self.trim_padding(token_ids)
        with torch.no_grad():
            return self.text(token_ids.long())


def load_vision_teacher(source: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu"
                        ) -> VisionTeacher:
    """The frozen BiomedCLIP image trunk (see :class:`VisionTeacher`); ``source`` as in the module docstring.

    The text tower is dropped after loading, so only the vision trunk stays in memory.
    """
    resolved = resolve_biomedclip_source(source)
    model = _create_biomedclip(resolved, device=device)
    visual = model.visual
    if not hasattr(visual, "trunk"):
        raise TypeError(f"{resolved}: the vision tower is {type(visual).__name__}, expected open_clip's TimmModel "
                        f"(a timm trunk) as in BiomedCLIP's config.")
    teacher = VisionTeacher(visual.trunk, visual.preprocess_cfg, source=resolved.open_clip_name)
    logger.info("vision teacher: %s, image %s, %d-d features", resolved.open_clip_name, teacher.image_size,
                teacher.output_dim)
    return teacher.to(device)


def load_tokenizer(source: Union[str, Path, None] = None, context_length: Optional[int] = None):
    """The text tower's tokenizer: a callable ``str | list[str] → LongTensor [B, context_length]``.

    It is open_clip's ``HFTokenizer`` (transformers ``AutoTokenizer`` loaded from the folder's saved
    tokenizer files — not rebuilt from ``vocab.txt``, which transformers 5.x turns into a 5-token vocabulary),
    picklable for DataLoader workers. ``context_length`` defaults to the config's (256 for BiomedCLIP).
    """
    import open_clip

    resolved = resolve_biomedclip_source(source)
    return open_clip.get_tokenizer(resolved.open_clip_name, context_length=context_length)


def load_text_teacher(source: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu"
                      ) -> TextTeacher:
    """The frozen BiomedCLIP text tower and its tokenizer (see :class:`TextTeacher`)."""
    resolved = resolve_biomedclip_source(source)
    model = _create_biomedclip(resolved, device=device)
    tokenizer = load_tokenizer(source)
    teacher = TextTeacher(model.text, tokenizer, source=resolved.open_clip_name)
    logger.info("text teacher: %s, context %d, %d-d features", resolved.open_clip_name, teacher.context_length,
                teacher.output_dim)
    return teacher.to(device)


__all__: List[str] = ["VisionTeacher", "TextTeacher", "load_vision_teacher", "load_text_teacher", "load_tokenizer",
                      "resolve_biomedclip_source", "BiomedCLIPSource"]
