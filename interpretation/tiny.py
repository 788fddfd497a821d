"""A tiny randomly initialised Llama-architecture language model and tokenizer, saved to disk, for tests and the
CPU try-out of the interpretation pipeline (``scripts/make_tiny_lm.py`` is its command line).

Real runs use a pretrained causal LM from a local folder (e.g. LLaVA-Med v1.5's Mistral-7B); this stand-in has
the same code path (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` of a folder) and random weights,
so its answers mean nothing.

The tokenizer is a byte-level BPE (any text encodes, nothing is ``<unk>``) trained in a fraction of a second on a
small built-in medical corpus plus any extra text given. By default it carries a Mistral-style chat template
(``<s>[INST] question [/INST] answer</s>``, the format LLaVA-Med v1.5 uses), so the chat-template path is what
the try-out exercises; ``chat_template=None`` gives a tokenizer without one (the plain template is used then).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch

MISTRAL_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

_CORPUS = """
What imaging modality is this? This is a CT scan. This is an MRI scan. This is an ultrasound image.
This is a fundus photograph. This is a pathology slide. This is a microscopy image. This is a nuclear medicine scan.
Is this a CT scan? Yes. No. Is there an abnormality? Which organ is shown? The liver, the brain, the lungs, the heart.
Axial computed tomography of the head and thorax. Magnetic resonance imaging of the brain, sagittal, coronal.
Retina, optic disc, macula, retinal vessels. Immunohistochemistry of the colon, nuclei counterstained with hematoxylin.
Echocardiogram frame of a cine loop. Whole body bone scan, anterior view. Phase contrast microscopy of cells.
Where is the lesion? What is abnormal? How many? Left, right, upper, lower, lobe, kidney, spleen, spine, vertebra.
"""


def make_tiny_tokenizer(out_dir: Union[str, Path, None] = None, extra_text: Iterable[str] = (), vocab_size: int = 512,
                        chat_template: Optional[str] = MISTRAL_STYLE_CHAT_TEMPLATE):
    """Train a byte-level BPE on the built-in corpus + ``extra_text``; returns a ``PreTrainedTokenizerFast``
    (saved to ``out_dir`` when given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_CORPUS, *extra_text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    if chat_template:
        tokenizer.chat_template = chat_template
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def make_tiny_lm(out_dir: Union[str, Path], seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, extra_text: Iterable[str] = (), chat_template: Optional[str] = MISTRAL_STYLE_CHAT_TEMPLATE,
                 vocab_size: int = 512) -> Path:
    """Write a random ``LlamaForCausalLM`` (hidden ``hidden_size``, ``num_layers`` layers) and its tokenizer to
    ``out_dir``; loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)`` /
    ``AutoTokenizer.from_pretrained(out_dir)``. Deterministic for a given seed. Returns ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out_dir, extra_text, vocab_size, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    return out_dir
