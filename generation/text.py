"""Report text ↔ fixed-length token ids for generators that model text (the joint diffusion model).

The tokenizer is any Hugging Face tokenizer in a local folder (an LLM backbone's own, a BERT vocabulary,
or one trained on the captions with :func:`train_caption_tokenizer`). A caption becomes

    [bos?] caption tokens [eos] [pad ...]      → LongTensor [text_len]

and a caption longer than the budget is truncated (its eos kept) and *counted*: :class:`TextCodec`
keeps ``truncated``/``seen`` totals and warns once per batch that had truncations, never silently.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import torch


class CaptionTruncationWarning(UserWarning):
    """Captions longer than the text budget were truncated."""


def load_text_tokenizer(folder: Union[str, Path]):
    """``AutoTokenizer.from_pretrained`` of a local folder, with an error that says how to make one."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"text tokenizer folder {folder} does not exist; make one with "
                                f"python -m generation.diffusion.make_tokenizer --csv CAPTIONS.csv --out {folder} "
                                f"or point at a backbone folder holding tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {folder} ({error}); the folder needs the files written "
                         f"by tokenizer.save_pretrained (tokenizer.json or vocab.txt + tokenizer_config.json)") from error


def train_caption_tokenizer(captions: Iterable[str], out_dir: Union[str, Path], vocab_size: int = 1000,
                            min_frequency: int = 1) -> Path:
    """Train a lower-cased WordPiece tokenizer on ``captions`` (HF ``tokenizers``) and save it as a
    ``BertTokenizerFast`` folder loadable with :func:`load_text_tokenizer`. For from-scratch models only."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise ValueError("no non-empty captions to train a text tokenizer on")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(out_dir))
    return out_dir


class TextCodec:
    """Captions → ids [B, text_len] and back, with counted truncation.

    Uses the tokenizer's bos/cls as the first token when it has one, eos/sep as the end, pad (or eos
    when there is no pad token, as for Llama) after it. ``vocab_size`` = len(tokenizer).
    """

    def __init__(self, tokenizer, text_len: int):
        if text_len < 3:
            raise ValueError(f"text_len={text_len} is too short (needs ≥ 3 for start, one token, end)")
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if self.eos is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither an eos nor a sep token")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.truncated = 0
        self.seen = 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, captions: Sequence[str], source: str = "captions") -> torch.Tensor:
        """list of B strings → LongTensor [B, text_len] in [0, vocab_size)."""
        start = [self.bos] if self.bos is not None else []
        room = self.text_len - len(start) - 1
        rows, cut = [], 0
        for caption in captions:
            ids = self.tokenizer(caption or "", add_special_tokens=False)["input_ids"]
            if len(ids) > room:
                cut += 1
                ids = ids[:room]
            row = start + ids + [self.eos]
            rows.append(row + [self.pad] * (self.text_len - len(row)))
        self.seen += len(captions)
        if cut:
            self.truncated += cut
            warnings.warn(f"{cut} of {len(captions)} {source} exceeded the text budget of {self.text_len} tokens and "
                          f"were truncated ({self.truncated} of {self.seen} so far); raise text_len to keep them whole",
                          CaptionTruncationWarning, stacklevel=2)
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> List[str]:
        """[B, text_len] → B strings: up to the first eos after the start token, special tokens dropped."""
        out = []
        for row in ids.tolist():
            body = row[1:] if self.bos is not None and row and row[0] == self.bos else row
            if self.eos in body:
                body = body[: body.index(self.eos)]
            body = [i for i in body if i < self.vocab_size]
            out.append(self.tokenizer.decode(body, skip_special_tokens=True).strip())
        return out
