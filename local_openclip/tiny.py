"""A tiny, randomly initialised BiomedCLIP-family model, saved in the real model's folder layout.

Tests and the CPU quick start need teachers that load offline in a second. ``make_tiny_biomedclip`` writes a
folder laid out exactly like ``external/biomedclip`` — ``open_clip_config.json`` (an open_clip
``CustomTextCLIP``: timm ViT image tower with ``timm_pool=""`` + linear projection, HF BERT text tower with
MLP projection and [CLS] pooling, context 256, OpenAI mean/std), ``open_clip_pytorch_model.bin``, the BERT
``config.json`` and saved tokenizer files — so ``load_vision_teacher("tiny")`` and ``load_text_teacher("tiny")``
run the same code as the real model. The weights are random: features carry no meaning.

Differences from BiomedCLIP, by design: the image trunk is timm's ``test_vit`` (patch 16, width 64, depth 6,
2 heads: vision features are 64-d, not 768), the text tower is a 2-layer width-32 BERT projecting to 32-d
(not 512), and the WordPiece vocabulary is a small hand-written one (special tokens, characters and a few
hundred common caption words) instead of PubMedBERT's 30,522 tokens — still a real tokenizer that splits
any text into ids.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import List, Union

import torch

from .teachers import OPEN_CLIP_CONFIG

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_EMBED_DIM = 32  # CLIP space = text-tower output width
TINY_VISION_TRUNK = "test_vit"  # timm's registered 0.37 M-parameter ViT (width 64)
TINY_IMAGE_SIZE = 224  # as BiomedCLIP, so the teacher's resize path is the real one
TINY_CONTEXT_LENGTH = 256  # as BiomedCLIP

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: HFTextEncoder masks id 0
_CAPTION_WORDS = """
a an the of and or with without in on at to from by for as is are was were be been this that these those
there here which who its it no not than then also both each other same left right upper lower anterior
posterior medial lateral superior inferior proximal distal bilateral unilateral small large mild moderate
severe multiple single normal abnormal image images scan scans view views slice slices axial coronal
sagittal frontal lateral oblique plane section sections showing shows shown demonstrates demonstrating
reveals revealing seen visible arrow arrows patient patients year old male female man woman child adult
ct mri mr x ray radiograph radiography chest abdomen abdominal pelvis pelvic head neck brain spine spinal
lung lungs liver kidney kidneys heart cardiac breast bone bones knee hip shoulder hand foot skull
fundus retina retinal optic disc macula vessel vessels eye ocular dermoscopy dermoscopic skin lesion
lesions melanoma nevus nevi keratosis carcinoma basal cell cells endoscopy endoscopic colon colonoscopy
polyp polyps stomach gastric esophagus bowel ultrasound sonography echogenic hypoechoic hyperechoic
thyroid pathology histology histopathology tissue stain stained staining hematoxylin eosin biopsy
microscopy magnification tumor tumour mass nodule nodules cyst cysts fracture fractures effusion
pneumonia pneumothorax edema opacity opacities consolidation atelectasis cardiomegaly calcification
hemorrhage infarct stroke metastasis metastases enhancement contrast enhanced weighted t1 t2 flair
diffusion signal intensity density dense low high increased decreased thickening dilation dilated
enlarged enlargement infiltration inflammation infection benign malignant cancer disease diagnosis
findings finding consistent suggestive evidence region area margin margins wall walls border
within around between along near adjacent surrounding measuring cm mm size diameter
""".split()
_WORD_PIECES = ["##s", "##es", "##ed", "##ing", "##ly", "##al", "##ic", "##ous", "##tion", "##ity"]
_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?()[]{}-+/=%'\"<>*&#@_~")


def tiny_vocabulary() -> List[str]:
    """The tiny WordPiece vocabulary: specials, single characters (so any text tokenizes), their ``##``
    continuations, suffix pieces and caption words; deduplicated in a fixed order (deterministic ids)."""
    pieces = _SPECIAL_TOKENS + _CHARACTERS + ["##" + c for c in _CHARACTERS if c.isalnum()] + _WORD_PIECES
    pieces += _CAPTION_WORDS
    return list(dict.fromkeys(pieces))


# BiomedCLIP's own sizes, for random stand-ins of the real architecture (speed/memory benchmarks offline).
FULL_SIZE = dict(vision_trunk="vit_base_patch16_224", embed_dim=512, text_width=768, text_layers=12, text_heads=12,
                 text_intermediate=3072)
TINY_SIZE = dict(vision_trunk=TINY_VISION_TRUNK, embed_dim=TINY_EMBED_DIM, text_width=32, text_layers=2, text_heads=2,
                 text_intermediate=64)


def make_tiny_biomedclip(out_dir: Union[str, Path], seed: int = 0, full_size: bool = False) -> Path:
    """Write the tiny BiomedCLIP-layout folder to ``out_dir`` (created; existing files overwritten).

    Deterministic for a given ``seed`` (the architecture is built by open_clip from the written config, then
    its random initial weights are saved). Returns ``out_dir`` as a Path. About 2 MB, < 10 s on 2 CPU cores.
    ``full_size=True`` writes BiomedCLIP's real architecture (ViT-B/16 trunk, 768-d; BERT-base text tower,
    512-d) with random weights (~800 MB; the small vocabulary is kept): for timing and memory benchmarks
    on machines that cannot download the real weights, never for training.
    """
    size = FULL_SIZE if full_size else TINY_SIZE
    import open_clip
    from transformers import BertConfig, BertTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("*.bin")) + list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.pth")):
        stale.unlink()  # a leftover checkpoint would be picked up by open_clip's local-dir loader

    vocabulary = tiny_vocabulary()
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path = Path(scratch) / "vocab.txt"
        vocab_path.write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
        # transformers 5.x: BertTokenizerFast(vocab_file=...) yields a 5-token vocabulary; BertTokenizer(vocab=...)
        # builds the real one, and save_pretrained writes the tokenizer.json that AutoTokenizer reads back.
        tokenizer = BertTokenizer(vocab=str(vocab_path), do_lower_case=True)
    if tokenizer.vocab_size != len(vocabulary):
        raise RuntimeError(f"tiny tokenizer has {tokenizer.vocab_size} tokens, expected {len(vocabulary)}")
    tokenizer.model_max_length = TINY_CONTEXT_LENGTH
    tokenizer.save_pretrained(str(out_dir))

    BertConfig(vocab_size=len(vocabulary), hidden_size=size["text_width"], num_hidden_layers=size["text_layers"],
               num_attention_heads=size["text_heads"], intermediate_size=size["text_intermediate"],
               max_position_embeddings=max(TINY_CONTEXT_LENGTH, 512), pad_token_id=0,
               # BERT's usual std-0.02 init makes a small random tower give (nearly) the same [CLS] feature for
               # every caption, so nothing could be aligned to it; a wide init keeps captions distinguishable.
               initializer_range=0.02 if full_size else 0.5,
               ).save_pretrained(str(out_dir))

    open_clip_config = {
        "model_cfg": {
            "embed_dim": size["embed_dim"],
            "vision_cfg": {"timm_model_name": size["vision_trunk"], "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": TINY_IMAGE_SIZE},
            "text_cfg": {
                # As in BiomedCLIP the tower is named by id; the loader points it at this folder's config.json.
                "hf_model_name": "tiny-random-bert (config.json in this folder)",
                "hf_tokenizer_name": "tiny-random-bert (tokenizer files in this folder)",
                "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": TINY_CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
        "comment": "Tiny random BiomedCLIP-family model for tests (scripts/make_tiny_networks.py); not pretrained.",
    }
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config, indent=2) + "\n", encoding="utf-8")

    from .teachers import _create_biomedclip, resolve_biomedclip_source, BiomedCLIPSource

    previous_disable_level = logging.root.manager.disable
    try:
        # open_clip warns (root logger) that no weights were found: expected here, we are creating them.
        logging.disable(logging.WARNING)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only; CUDA generators untouched
            model = _create_biomedclip(BiomedCLIPSource(local_dir=out_dir.resolve(), given=str(out_dir)),
                                       load_weights=False)
    finally:
        logging.disable(previous_disable_level)
    torch.save(model.state_dict(), out_dir / "open_clip_pytorch_model.bin")
    resolve_biomedclip_source(out_dir)  # the folder now passes the same checks as the real one
    del open_clip
    return out_dir
