"""Generative models over MedITok token ids (paper Table 3: modality-conditioned image synthesis).

Depends only on ``meditok`` (plus torch, numpy, tqdm), never on the tokenizer's training code, so
any downstream generator can reuse its parts:

* :mod:`generation.token_cache` — images → a memory-mapped id array ``[N, 8, h·w]`` + labels +
  manifest (CLI ``python -m generation.tokenize_dataset``), and :class:`TokenCache` to read it back.
* :mod:`generation.conditioning` — label embedding with a null label for classifier-free guidance.
* :mod:`generation.ar_model` — the autoregressive generator (LlamaGen-style, presets tiny/B/L/XL).
* :mod:`generation.sample` — KV-cache sampling (CLI ``python -m generation.sample``).
* :mod:`generation.train_ar` — training (CLI ``python -m generation.train_ar``).

See docs/synthesis.md for the three commands (cache → train → sample/evaluate).
"""
from .conditioning import LabelEmbedding, guided_logits
from .token_cache import TokenCache, TokenCacheError, check_same_tokenizer, tokenizer_fingerprint, write_token_cache

__all__ = ["LabelEmbedding", "guided_logits", "TokenCache", "TokenCacheError", "check_same_tokenizer",
           "tokenizer_fingerprint", "write_token_cache"]
