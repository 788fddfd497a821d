"""Report-generation metrics (BLEU-1..4, ROUGE-L, METEOR) and image–report agreement.

Text metrics come from well-kept libraries: nltk (``corpus_bleu``, ``meteor_score``) and Google's
``rouge-score``. Words are lower-cased and split by nltk's ``wordpunct_tokenize`` (no download needed).

METEOR's synonym stage needs the WordNet corpus, which nltk downloads from the internet (not PyPI).
When ``nltk.data.find('corpora/wordnet')`` fails we run METEOR with an empty synonym source (exact +
Porter-stem matches only) and say so in the result (``meteor_wordnet: false``): such numbers are
lower than, and not comparable to, published METEOR with WordNet. Put WordNet in ``$NLTK_DATA`` (e.g.
``python -m nltk.downloader -d DIR wordnet`` on a machine with internet) to get the full metric.

Agreement: a CLIP-score-style judge that runs offline. Images go through a stage-2 MedITok's alignment
embedding (``encode_image(x, normalize=True)``, 768-d), reports through the frozen BiomedCLIP text tower
and the stage-2 text head f_text (LayerNorm + linear to 768, from the stage-2 training checkpoint, key
``heads``) — the two sides stage 2 trained to agree (docs/method.md §2). Score = mean cosine similarity.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


class _NoWordNet:
    """Stands in for nltk's WordNet reader: no synsets, so METEOR matches exact words and stems only."""

    def synsets(self, *args, **kwargs) -> List[Any]:
        return []


def wordnet_available() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        return True
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
            return True
        except LookupError:
            return False


def words(text: str) -> List[str]:
    from nltk.tokenize import wordpunct_tokenize

    return [w for w in wordpunct_tokenize(text.lower()) if w.strip()]


def report_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> Dict[str, Any]:
    """Corpus BLEU-1..4 (nltk, smoothing method 1), mean ROUGE-L F1 (rouge-score, stemmed) and mean
    METEOR (nltk) of generated reports against one reference each. Values in [0, 1]."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many references as hypotheses (got {len(references)} and {len(hypotheses)}, ≥ 1)")
    refs = [[words(r)] for r in references]
    hyps = [words(h) for h in hypotheses]
    smooth = SmoothingFunction().method1
    out: Dict[str, Any] = {}
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        out[f"bleu{n}"] = corpus_bleu(refs, hyps, weights=weights, smoothing_function=smooth)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out["rougeL"] = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)) / len(hyps)
    has_wordnet = wordnet_available()
    kwargs = {} if has_wordnet else {"wordnet": _NoWordNet()}
    out["meteor"] = sum(meteor_score(ref, hyp, **kwargs) for ref, hyp in zip(refs, hyps)) / len(hyps)
    out["meteor_wordnet"] = has_wordnet
    out["num_reports"] = len(hyps)
    out["mean_words"] = sum(len(h) for h in hyps) / len(hyps)
    return out


class TextAlignmentHead(nn.Module):
    """f_text of stage 2: LayerNorm + linear from the text teacher's width to the tokenizer's embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(x.float())), dim=-1)


def load_text_head(checkpoint: Union[str, Path]) -> TextAlignmentHead:
    """The stage-2 f_text from a training checkpoint (``{'heads': {'norm.*', 'proj.*'}, ...}``; of a stage-3
    checkpoint, ``heads['text']``). ``checkpoint``: a ``ckpt-*.pth`` file, or a run folder (its newest one)."""
    path = Path(checkpoint)
    if path.is_dir():
        found = sorted(path.glob("ckpt-*.pth"))  # train.py's names: ckpt-{step:08d}.pth, so sorted = by step
        path = found[-1] if found else path / "ckpt-*.pth"
    if not path.is_file():
        raise FileNotFoundError(f"alignment checkpoint {path} does not exist; pass a stage-2 training checkpoint "
                                f"or its run folder (e.g. runs/stage2_tiny, which holds ckpt-00000060.pth)")
    import meditok
    payload = meditok.safe_load(path, what="tokenizer training checkpoint")  # its heads are checked below
    heads = payload.get("heads") if isinstance(payload, dict) else None
    if isinstance(heads, dict) and isinstance(heads.get("text"), dict):
        heads = heads["text"]  # a --stage 3 checkpoint holds {"vision": ..., "text": ...}
    if not heads or "proj.weight" not in heads:
        raise ValueError(f"{path} holds no stage-2 text head ('heads' with proj.weight); agreement needs the "
                         f"stage-2 training checkpoint, not a stage-1 one or an exported tokenizer")
    out_dim, in_dim = heads["proj.weight"].shape
    head = TextAlignmentHead(in_dim, out_dim)
    head.load_state_dict(heads)
    return head.eval()


class AgreementJudge:
    """cos(MedITok alignment embedding of an image, f_text(BiomedCLIP text embedding of a report))."""

    def __init__(self, meditok_model, text_teacher, text_head: TextAlignmentHead):
        if text_head.proj.in_features != text_teacher.output_dim:
            raise ValueError(f"the stage-2 text head expects {text_head.proj.in_features}-d text features but the "
                             f"BiomedCLIP text tower gives {text_teacher.output_dim}-d; use the teacher stage 2 used")
        self.meditok, self.teacher, self.head = meditok_model, text_teacher, text_head

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, D] unit vectors."""
        return self.meditok.encode_image(images.to(self.meditok.device), normalize=True).float().cpu()

    @torch.no_grad()
    def text_embeddings(self, reports: Sequence[str]) -> torch.Tensor:
        device = next(self.teacher.parameters()).device
        tokens = self.teacher.tokenize(list(reports)).to(device)
        return self.head.to(device)(self.teacher(tokens)).float().cpu()

    def scores(self, images: torch.Tensor, reports: Sequence[str]) -> torch.Tensor:
        """Per-pair cosine similarity [B] in [-1, 1]."""
        return (self.image_embeddings(images) * self.text_embeddings(reports)).sum(dim=-1)
