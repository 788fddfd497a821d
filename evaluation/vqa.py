"""Medical VQA with MedITok as a language model's vision tower — the paper's Table 4 (VQA-RAD, SLAKE) from one command.

Protocol (docs/vqa.md): each question is asked once with the model's conversation template, answered by greedy
decoding (no sampling, one beam, up to --max-new-tokens), and scored against the reference answer after
normalisation (lower case; punctuation → spaces; the articles a/an/the dropped; whitespace collapsed):

  closed questions (yes/no, answer_type CLOSED)  accuracy = exact match of the normalised strings
  open questions                                 recall = share of the reference's words found in the answer
                                                 (LLaVA-Med's open-question convention), and exact match
  overall                                        mean over all questions of (closed: exact match; open: recall):
                                                 the figure put beside the paper's Table 4 numbers

Also reported: closed accuracy under LLaVA-Med's containment rule (the reference's words appear, in order, in
the answer) — it forgives "Yes, there is." for "yes". Per split, per answer type and per question type
(VQA-RAD ``question_type``, SLAKE ``content_type``).

Examples:
  python -m evaluation.vqa --run runs/vqa/stageB --dataset vqa-rad --data "VQA_RAD/VQA_RAD Dataset Public.json" --split test
  python -m evaluation.vqa --run runs/vqa/stageB --dataset slake --data Slake1.0        # validate.json + test.json
  python -m evaluation.vqa --run runs/vqa_tiny/stageB --data datasets/meta/vqa_examples_val.csv \\
      --image-root datasets/examples                                                  # the bundled try-out set

Writes vqa.json (settings, conventions, environment, results), vqa.md (Table 4 layout with the paper's rows, then
the breakdowns), vqa.csv (one row per benchmark and group) and vqa_predictions.csv (every question, answer and
score) to --out.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from tqdm import tqdm

from .report import environment, markdown_table, relative, write_outputs

# Table 4 of the paper (accuracy, %): MedITok, and LLaVA-Med's own image encoder, in the same pipeline.
TABLE4_COLUMNS = ("VQA-RAD", "SLAKE val", "SLAKE test")
TABLE4_PAPER = {
    "MedITok (paper)": {"VQA-RAD": 52.99, "SLAKE val": 49.02, "SLAKE test": 48.09},
    "LLaVA-Med's encoder (paper)": {"VQA-RAD": 43.90, "SLAKE val": 40.30, "SLAKE test": 38.73},
}
PAPER_QUESTION_COUNTS = {"VQA-RAD": 451, "SLAKE val": 2094, "SLAKE test": 2099}
ARTICLES = frozenset({"a", "an", "the"})

CONVENTIONS = {
    "normalisation": "lower case; every character that is not a letter, digit or whitespace (and '_') becomes a "
                     "space; the articles a/an/the are dropped; whitespace collapsed",
    "closed": "exact match of the normalised answer and reference (1 or 0)",
    "closed_contains": "LLaVA-Med's rule, on words: 1 if the reference's normalised words occur contiguously in the "
                       "answer's (LLaVA-Med tests substrings, so 'no' matched 'not'; it also dropped wrong closed "
                       "answers that contain yes/no from the denominator; here every closed question counts)",
    "open_recall": "share of the reference's normalised words present in the answer, each word matched at most as "
                   "often as it occurs in the answer (LLaVA-Med's open-question recall)",
    "open_exact": "exact match of the normalised strings",
    "overall": "mean over all questions of the closed exact match and the open recall: the number beside Table 4",
    "generation": "greedy decoding (do_sample=False, one beam), the model's conversation template, one question per "
                  "image, answer stripped of special tokens",
    "slake": "English subset only (q_lang == 'en')",
    "vqa_rad_test": "phrase_type test_freeform + test_para (451 questions in the release)",
}


# ----------------------------------------------------------------------------------------------------
# Scoring
def normalize_answer(text: str) -> str:
    """'The Left Lung.' → 'left lung' (see CONVENTIONS['normalisation'])."""
    text = re.sub(r"[^\w\s]|_", " ", str(text).lower())
    return " ".join(word for word in text.split() if word not in ARTICLES)


def closed_exact(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def closed_contains(prediction: str, reference: str) -> float:
    """1.0 when the reference's normalised words appear contiguously in the prediction's."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not ref:
        return float(not pred)
    return float(any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1)))


def open_recall(prediction: str, reference: str) -> float:
    """Share of the reference's normalised words found in the prediction (multiset matching)."""
    ref = normalize_answer(reference).split()
    if not ref:
        return closed_exact(prediction, reference)
    available = Counter(normalize_answer(prediction).split())
    hits = 0
    for word in ref:
        if available[word] > 0:
            available[word] -= 1
            hits += 1
    return hits / len(ref)


def answer_type_of(reference: str, answer_type: Optional[str]) -> str:
    """The record's answer type, or — when the file has none — 'closed' for yes/no references, else 'open'."""
    if answer_type in ("open", "closed"):
        return answer_type
    return "closed" if normalize_answer(reference) in ("yes", "no") else "open"


def score(prediction: str, reference: str, answer_type: str) -> Dict[str, Optional[float]]:
    """All scores of one answer; the ones that do not apply to its answer type are None."""
    if answer_type == "closed":
        exact = closed_exact(prediction, reference)
        return {"score": exact, "closed": exact, "closed_contains": closed_contains(prediction, reference),
                "open_recall": None, "open_exact": None}
    recall = open_recall(prediction, reference)
    return {"score": recall, "closed": None, "closed_contains": None, "open_recall": recall,
            "open_exact": closed_exact(prediction, reference)}


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return 100.0 * sum(values) / len(values) if values else None


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Scored rows → counts and scores in % (overall, closed, closed_contains, open_recall, open_exact)."""
    return {"questions": len(rows), "closed_questions": sum(r["answer_type"] == "closed" for r in rows),
            "open_questions": sum(r["answer_type"] == "open" for r in rows),
            **{key: _mean(r[key] for r in rows) for key in ("score", "closed", "closed_contains", "open_recall",
                                                             "open_exact")}}


def breakdown(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Summaries per benchmark: all, per answer type, per question type."""
    out = []
    by_benchmark = defaultdict(list)
    for row in rows:
        by_benchmark[row["benchmark"]].append(row)
    for benchmark, items in by_benchmark.items():
        out.append({"benchmark": benchmark, "group": "all", **summarise(items)})
        for key in ("answer_type", "question_type"):
            groups = defaultdict(list)
            for row in items:
                groups[row.get(key) or "(none)"].append(row)
            for name in sorted(groups):
                out.append({"benchmark": benchmark, "group": f"{key}={name}", **summarise(groups[name])})
    return out


# ----------------------------------------------------------------------------------------------------
# Data and generation
def benchmark_name(dataset: str, split: Optional[str], path: Path) -> str:
    if dataset == "vqa-rad":
        return "VQA-RAD" if split == "test" else f"VQA-RAD {split or 'all'}"
    if dataset == "slake":
        return f"SLAKE {split}" if split else "SLAKE"
    return path.stem if not split or split in path.stem else f"{path.stem} {split}"


def expand_data(paths: Sequence[str], dataset: str) -> List[Path]:
    """A SLAKE folder → its validate.json and test.json; files as they are."""
    out = []
    for p in map(Path, paths):
        if p.is_dir() and dataset in ("slake", "auto") and (p / "test.json").is_file():
            out.extend(f for f in (p / "validate.json", p / "test.json") if f.is_file())
        else:
            out.append(p)
    return out


def load_questions(args) -> List[Any]:
    from interpretation.data import DataFormatError, check_images_exist, detect_format, read_records

    records = []
    for path in expand_data(args.data, args.dataset):
        try:
            fmt = detect_format(path) if args.dataset == "auto" else args.dataset
            items = read_records(path, fmt, args.image_root, split=args.split)
        except DataFormatError as error:
            raise SystemExit(f"error: {error}") from None
        for record in items:
            if len(record.turns) != 1:  # multi-turn LLaVA records: the first turn is the question
                record.turns = record.turns[:1]
            record.extra["benchmark"] = benchmark_name(fmt, record.split, path)
        records.extend(items[: args.limit] if args.limit else items)
    try:
        check_images_exist(records, args.image_root)
    except DataFormatError as error:
        raise SystemExit(f"error: {error}") from None
    return records


def predict(model, records: Sequence[Any], batch_size: int, max_new_tokens: int) -> List[str]:
    """Greedy answers for the records, in order."""
    tower = model.vision_tower
    answers: List[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc="answering", unit="batch"):
        chunk = records[start:start + batch_size]
        images = torch.stack([tower.load_image(r.image, r.modality) for r in chunk])
        answers.extend(model.generate(images, [r.question for r in chunk], max_new_tokens=max_new_tokens))
    return answers


def score_rows(records: Sequence[Any], answers: Sequence[str]) -> List[Dict[str, Any]]:
    rows = []
    for record, answer in zip(records, answers):
        kind = answer_type_of(record.answer, record.answer_type)
        rows.append({"benchmark": record.extra["benchmark"], "id": record.id, "image": str(record.image),
                     "question": record.question, "reference": record.answer, "prediction": answer,
                     "answer_type": kind, "question_type": record.question_type, **score(answer, record.answer, kind)})
    return rows


# ----------------------------------------------------------------------------------------------------
# Report
def table4_markdown(summaries: Sequence[Dict[str, Any]], label: str) -> str:
    ours = {s["benchmark"]: s["score"] for s in summaries if s["group"] == "all"}
    columns = list(TABLE4_COLUMNS) + [b for b in ours if b not in TABLE4_COLUMNS]
    rows = [[name] + [values.get(c) for c in columns] for name, values in TABLE4_PAPER.items()]
    rows.append([label] + [ours.get(c) for c in columns])
    return markdown_table(["encoder"] + columns, rows)


def breakdown_markdown(summaries: Sequence[Dict[str, Any]]) -> str:
    header = ["benchmark", "group", "questions", "overall", "closed (exact)", "closed (contains)", "open recall",
              "open exact"]
    rows = [[s["benchmark"], s["group"], s["questions"], s["score"], s["closed"], s["closed_contains"],
             s["open_recall"], s["open_exact"]] for s in summaries]
    return markdown_table(header, rows)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout (its examples) and shows every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.vqa", description=__doc__, epilog="Details: docs/vqa.md.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--run", required=True, help="folder of a finished 'python -m interpretation.train --stage B' run")
    parser.add_argument("--data", nargs="+", required=True,
                        help="question file(s): VQA-RAD's 'VQA_RAD Dataset Public.json', SLAKE's validate.json / "
                             "test.json (or the Slake1.0 folder), a LLaVA JSON or a CSV (image, question, answer)")
    parser.add_argument("--dataset", default="auto", choices=("auto", "vqa-rad", "slake", "csv", "llava"),
                        help="format of --data (auto: detected from the file)")
    parser.add_argument("--image-root", default=None,
                        help="image folder (default: the release layout next to the file, else its folder)")
    parser.add_argument("--split", default=None,
                        help="keep one split (VQA-RAD: test or train; SLAKE: val/test from the file names; CSV: "
                             "its split column)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each file (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions answered at once")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer generated")
    parser.add_argument("--language-model", default=None, help="override the run's language-model folder")
    parser.add_argument("--vision-tower", default=None,
                        help="the run's MedITok weights at another path (refused when the weights differ from the "
                             "ones the run was trained with)")
    parser.add_argument("--allow-other-vision-tower", action="store_true",
                        help="answer with a --vision-tower whose weights differ from the run's (with a warning: the "
                             "answers then say nothing about the run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--bf16", action="store_true", help="language model and encoder in bf16 (GPU)")
    parser.add_argument("--label", default=None, help="name of our row in the table (default: the run folder)")
    parser.add_argument("--out", default="outputs/vqa", help="output folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from interpretation.inference import load_trained

    records = load_questions(args)
    try:
        model, description = load_trained(args.run, args.device, args.language_model, args.vision_tower, args.bf16,
                                          allow_other_vision_tower=args.allow_other_vision_tower)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    start = time.time()
    answers = predict(model, records, args.batch_size, args.max_new_tokens)
    seconds = time.time() - start
    rows = score_rows(records, answers)
    summaries = breakdown(rows)
    label = args.label or f"ours ({relative(Path(args.run))})"
    warnings = []
    tower_check = description.get("vision_tower_check") or {}
    if tower_check.get("warning"):
        warnings.append(tower_check["warning"])
    if str(tower_check.get("vision_tower") or description.get("vision_tower", "")).startswith("random:"):
        warnings.append("THE VISION TOWER HAS RANDOM WEIGHTS: a smoke test of the pipeline only; the accuracy says "
                        "nothing about MedITok")
    markdown = "\n\n".join([f"**WARNING: {w}**" for w in warnings] + [
        "## Table 4: medical VQA accuracy (%)", table4_markdown(summaries, label),
        "Ours: overall = mean over questions of closed exact match and open recall (docs/vqa.md). The paper does "
        "not state its matching rule.",
        "## Breakdown (%)", breakdown_markdown(summaries)])
    payload = {"command": " ".join([sys.executable, "-m", "evaluation.vqa", *(argv or sys.argv[1:])]),
               "warnings": warnings, "run": description, "settings": vars(args), "conventions": CONVENTIONS,
               "paper": {"table4": TABLE4_PAPER, "question_counts": PAPER_QUESTION_COUNTS},
               "results": summaries, "seconds": seconds, "questions_per_s": len(rows) / max(seconds, 1e-9),
               "environment": environment(torch.device(args.device))}
    written = write_outputs(Path(args.out), "vqa", payload, markdown, {"": summaries, "predictions": rows})
    print(markdown)
    print("wrote " + ", ".join(relative(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
