"""MedITok + projector + a causal language model (LLaVA-style), on ``transformers`` and ``peft``.

How an image enters the language model (paper Table 4; docs/vqa.md):

1. The prompt holds the placeholder ``<image>`` exactly once. At tokenisation the placeholder becomes
   ``L`` copies of the sentinel id :data:`IMAGE_TOKEN_INDEX` (L = the vision tower's tokens per image), so a
   sequence's length is known before any image is encoded and batches pad like plain text.
2. The vision tower turns the image into features [B, L, vit_width]; the projector (``linear`` or
   ``mlp2x_gelu``, as in LLaVA) maps them to the language model's hidden size.
3. The text tokens are embedded with the language model's own embedding table and the L sentinel positions of
   each row are overwritten, in order, by that row's L projected features; the result goes to the language
   model as ``inputs_embeds``.

Labels are ``-100`` everywhere except on answer tokens (and the end-of-answer token), so the loss is the answer's
next-token cross-entropy only.

Conversation templates (:class:`ConversationTemplate`):
  ``chat``     the tokenizer's own chat template (``tokenizer.apply_chat_template``); LLaVA-Med v1.5's Mistral
               tokenizer renders ``<s>[INST] question [/INST] answer</s>``
  ``plain``    for tokenizers without one: ``<bos>USER: question ASSISTANT: answer<eos>`` (LLaVA's v1 style)
  ``caption``  projector pre-training (stage A): ``<bos><image>\\n`` then the caption, supervised, ``<eos>``
               (LLaVA's "plain" pre-training format: no instruction)
  ``auto``     ``chat`` when the tokenizer has a chat template, else ``plain``
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .vision_tower import MedITokVisionTower

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
TEMPLATES = ("auto", "chat", "plain", "caption")
PROJECTOR_FILE = "projector.safetensors"


class PromptError(ValueError):
    """A prompt or conversation the model cannot use (names its source and the fix)."""


class ProjectorMismatchError(ValueError):
    """A projector checkpoint whose shapes do not fit the vision tower / language model."""


# ----------------------------------------------------------------------------------------------------
# Projector
def build_projector(kind: str, vision_hidden: int, lm_hidden: int) -> nn.Module:
    """``linear``: one Linear; ``mlp2x_gelu``: Linear → GELU → Linear (LLaVA-1.5's projector).
    Maps [B, L, vision_hidden] → [B, L, lm_hidden]."""
    if kind == "linear":
        return nn.Linear(vision_hidden, lm_hidden)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden))
    raise ValueError(f"projector {kind!r}: use one of {PROJECTOR_TYPES}")


def projector_shapes(kind: str, vision_hidden: int, lm_hidden: int) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_projector(kind, vision_hidden, lm_hidden).state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# Conversation templates → (text, supervised) segments
@dataclass
class Segment:
    text: str
    supervised: bool


class ConversationTemplate:
    """Turns (question, answer) turns into text segments, marking which ones are supervised (see module doc)."""

    def __init__(self, tokenizer, name: str = "auto"):
        if name not in TEMPLATES:
            raise ValueError(f"template {name!r}: use one of {TEMPLATES}")
        if name == "auto":
            name = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' but the tokenizer has no chat_template: use --template plain")
        self.tokenizer = tokenizer
        self.name = name
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""

    def _chat(self, messages, generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def segments(self, turns: Sequence[Tuple[str, Optional[str]]]) -> List[Segment]:
        """turns: [(question, answer), ...]; the last answer may be None (a generation prompt)."""
        out: List[Segment] = []
        if self.name == "caption":
            (question, answer), = turns  # stage A: one caption per image
            out.append(Segment(self.bos + question, False))
            if answer is not None:
                out.append(Segment(answer + self.eos, True))
            return out
        if self.name == "plain":
            for i, (question, answer) in enumerate(turns):
                out.append(Segment((self.bos if i == 0 else " ") + f"USER: {question} ASSISTANT:", False))
                if answer is not None:
                    out.append(Segment(" " + answer + self.eos, True))
            return out
        messages: List[Dict[str, str]] = []
        rendered = ""
        for question, answer in turns:
            messages.append({"role": "user", "content": question})
            prompt = self._chat(messages, generation=True)
            out.append(Segment(self._suffix(rendered, prompt), False))
            rendered = prompt
            if answer is None:
                break
            messages.append({"role": "assistant", "content": answer})
            full = self._chat(messages, generation=False)
            answer_text = self._suffix(rendered, full)
            if self.eos and self.eos not in answer_text:
                answer_text += self.eos  # the model must learn to stop even if the template does not say so
            out.append(Segment(answer_text, True))
            rendered = full
        return out

    @staticmethod
    def _suffix(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise PromptError("the tokenizer's chat template does not render a conversation as a prefix of its "
                              "continuation, so prompt and answer tokens cannot be separated: use --template plain")
        return text[len(prefix):]

    def prompt(self, question: str) -> str:
        """The generation prompt for one question (the text the answer follows)."""
        return "".join(s.text for s in self.segments([(question, None)]))


def with_placeholder(question: str) -> str:
    """Put the image placeholder in front of a question that has none (VQA-RAD/SLAKE questions, CSV rows)."""
    return question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"


def tokenize_segments(tokenizer, segments: Sequence[Segment], num_image_tokens: int, source: str = "prompt",
                      max_length: Optional[int] = None) -> Dict[str, List[int]]:
    """Segments → ``input_ids`` (the placeholder expanded to ``num_image_tokens`` × :data:`IMAGE_TOKEN_INDEX`) and
    ``labels`` (token ids on supervised segments, :data:`IGNORE_INDEX` elsewhere).

    Raises PromptError (naming ``source``) unless the placeholder occurs exactly once, in a prompt segment.
    Sequences longer than ``max_length`` are cut at the end (answer tokens go first); a cut that would reach the
    image tokens is an error.
    """
    count = sum(s.text.count(IMAGE_PLACEHOLDER) for s in segments)
    if count != 1:
        what = "has no" if count == 0 else f"has {count}"
        raise PromptError(f"{source}: the prompt {what} image placeholder {IMAGE_PLACEHOLDER!r}; put it exactly "
                          f"once in the first question (e.g. '{IMAGE_PLACEHOLDER}\\nWhat is shown?')")
    ids: List[int] = []
    labels: List[int] = []
    for segment in segments:
        if segment.supervised and IMAGE_PLACEHOLDER in segment.text:
            raise PromptError(f"{source}: the image placeholder {IMAGE_PLACEHOLDER!r} is in an answer; move it to "
                              f"the first question")
        for k, piece in enumerate(segment.text.split(IMAGE_PLACEHOLDER)):
            if k:
                ids.extend([IMAGE_TOKEN_INDEX] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                labels.extend(piece_ids if segment.supervised else [IGNORE_INDEX] * len(piece_ids))
    if max_length is not None and len(ids) > max_length:
        if IMAGE_TOKEN_INDEX in ids[max_length:]:
            raise PromptError(f"{source}: {len(ids)} tokens, and --max-length {max_length} would cut the image "
                              f"tokens; raise --max-length or shorten the prompt")
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_batch(rows: Sequence[Dict[str, List[int]]], pad_id: int, side: str = "right") -> Dict[str, torch.Tensor]:
    """Token rows → ``input_ids`` / ``labels`` / ``attention_mask`` [B, T] (int64), padded on ``side``."""
    length = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for r in rows:
        n = length - len(r["input_ids"])
        def place(values, fill):
            return values + [fill] * n if side == "right" else [fill] * n + values
        out["input_ids"].append(place(list(r["input_ids"]), pad_id))
        out["labels"].append(place(list(r.get("labels", [IGNORE_INDEX] * len(r["input_ids"]))), IGNORE_INDEX))
        out["attention_mask"].append(place([1] * len(r["input_ids"]), 0))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
class MedITokLlava(nn.Module):
    """Vision tower (frozen MedITok) → projector → causal language model.

    Args:
        vision_tower: a :class:`MedITokVisionTower`.
        language_model: any ``AutoModelForCausalLM`` (optionally wrapped by peft for LoRA).
        tokenizer: the language model's tokenizer (needs a pad or eos token for batching).
        projector_type: one of :data:`PROJECTOR_TYPES`.
        template: one of :data:`TEMPLATES` for question answering (stage A always uses ``caption``).
    """

    def __init__(self, vision_tower: MedITokVisionTower, language_model: nn.Module, tokenizer,
                 projector_type: str = "mlp2x_gelu", template: str = "auto"):
        super().__init__()
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.projector_type = projector_type
        self.projector = build_projector(projector_type, vision_tower.hidden_size, self.lm_hidden_size)
        self.template = ConversationTemplate(tokenizer, template)
        self.caption_template = ConversationTemplate(tokenizer, "caption")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def lm_hidden_size(self) -> int:
        return self.language_model.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return self.projector.state_dict()[next(iter(self.projector.state_dict()))].device

    # ------------------------------------------------------------------------------------------------
    def encode_prompt(self, turns: Sequence[Tuple[str, Optional[str]]], caption: bool = False, source: str = "prompt",
                      max_length: Optional[int] = None) -> Dict[str, List[int]]:
        """Turns (question, answer) → token ids and labels (see :func:`tokenize_segments`)."""
        template = self.caption_template if caption else self.template
        return tokenize_segments(self.tokenizer, template.segments(turns), self.vision_tower.num_tokens, source,
                                 max_length)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] → projected features [B, L, lm_hidden] in the LM's embedding dtype."""
        features = self.vision_tower(images)
        weight_dtype = next(self.projector.parameters()).dtype
        projected = self.projector(features.to(weight_dtype))
        return projected.to(self.language_model.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] with L sentinel positions per row, image_features [B, L, D] → inputs_embeds [B, T, D]."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        per_row = is_image.sum(dim=1)
        if not bool((per_row == image_features.shape[1]).all()):
            raise PromptError(f"each row needs exactly {image_features.shape[1]} image positions (one placeholder "
                              f"expanded), got {per_row.tolist()}: build the ids with encode_prompt")
        embeddings = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        # masked_scatter fills the True positions in row-major order, i.e. row by row, feature by feature.
        return embeddings.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeddings.dtype))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None):
        """Training pass; returns the language model's output (``.loss``: mean next-token cross-entropy over the
        positions whose label is not -100; the shift is done by the language model)."""
        inputs_embeds = self.embed(input_ids, self.image_features(images))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                                   use_cache=False)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 32) -> List[str]:
        """Greedy answers to one question per image. images [B, 3, H, W] in [-1, 1]; questions without a
        placeholder get one in front. Returns the decoded answers (special tokens removed, stripped)."""
        rows = [self.encode_prompt([(with_placeholder(q), None)], source=f"question {i}") for i, q in enumerate(questions)]
        batch = pad_batch(rows, self.tokenizer.pad_token_id, side="left")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        inputs_embeds = self.embed(batch["input_ids"], self.image_features(images.to(self.device)))
        output = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------------
    def projector_config(self) -> Dict[str, Any]:
        return {"projector_type": self.projector_type, "vision_hidden_size": self.vision_tower.hidden_size,
                "lm_hidden_size": self.lm_hidden_size}

    def save_projector(self, path: Union[str, Path]) -> Path:
        """Write the projector as ``safetensors`` with its type and sizes in the metadata (atomically)."""
        from safetensors.torch import save_file

        from meditok import atomic_write_via_path

        path = Path(path)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        metadata = {"config": json.dumps(self.projector_config())}
        atomic_write_via_path(path, lambda tmp: save_file(state, tmp, metadata=metadata))
        return path

    def load_projector(self, path: Union[str, Path]) -> None:
        """Load a projector written by :meth:`save_projector` (a file or a run folder holding one)."""
        state, config = read_projector(path)
        path = Path(path) / PROJECTOR_FILE if Path(path).is_dir() else Path(path)
        mine = self.projector_config()
        for key, what, fix in (("projector_type", "projector type", "pass --projector {theirs}"),
                               ("vision_hidden_size", "vision-tower width", "use the tokenizer the projector was "
                                                                           "trained with (--vision-tower)"),
                               ("lm_hidden_size", "language-model hidden size", "use the language model the projector "
                                                                                "was trained with (--language-model)")):
            theirs = config.get(key)
            if theirs is not None and theirs != mine[key]:
                raise ProjectorMismatchError(
                    f"{path}: the projector checkpoint has {what} {theirs}, this model has {mine[key]}; "
                    + fix.format(theirs=theirs))
        self.projector.load_state_dict({k: v.to(self.device) for k, v in state.items()})


def read_projector(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, config) of a projector file, or of ``<folder>/projector.safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no projector checkpoint here; pass the stage-A run folder (holding "
                                f"{PROJECTOR_FILE}) or the file itself")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    return state, json.loads(metadata.get("config", "{}"))
