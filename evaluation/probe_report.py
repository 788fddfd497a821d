"""Linear-probe outputs: the protocol description, the averages beside the paper's Table 2, and the Markdown report.

:func:`probe_averages` averages the peaks over the paper's five Table 2 datasets (and, separately, over any
other datasets); :func:`to_markdown` writes linear_probe.md; ``PROTOCOL`` is stored in linear_probe.json.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .paper import PAPER, TABLE2_DATASETS, TABLE2_MEDITOK_AVERAGE
from .probe_data import MULTI_CLASS
from .report import markdown_table

PROTOCOL = {
    "classifier": "one torch.nn.Linear layer on frozen features (no normalisation, no hidden layer), initialised "
                  "at zero",
    "optimiser": "Adam, lr 1e-4 (default), batch 128, no weight decay, no schedule",
    "loss": "cross-entropy (multi-class, incl. 2-class binary tasks); BCE-with-logits (multi-label)",
    "reported": "peak test mAP and peak test AUC over the epochs (the paper's 'peak test mAP / AUC'), each "
                "with its epoch; also the test metrics at the epoch of best validation AUC when a val split exists",
    "auc": "ROC AUC, one-vs-rest macro mean over classes (multi-class) or mean over labels (multi-label); classes "
           "with one value only in the test set are left out",
    "map": "average precision (sum over recall steps of precision, ties grouped), averaged like AUC; for a binary "
           "(2-class) task the AP of the positive class (label 1); 'map_two_class' is the mean AP over both classes",
    "scores": "float64 per-class log-odds of the probe's logits (one-vs-rest for softmax tasks), not float32 "
              "probabilities, which tie at 1.0 for confident predictions",
    "average": "mean over the paper's Table 2 datasets present (" + ", ".join(TABLE2_DATASETS) + "); other datasets "
               "are averaged separately and never mixed into it",
    "acc": "argmax accuracy (multi-class); element-wise accuracy at probability 0.5 (multi-label)",
}


def table2_dataset(name: str) -> Optional[str]:
    """The Table 2 dataset a probe task is ('breastmnist_224' → 'breastmnist'), or None."""
    stem = name.lower().split("_")[0]
    return stem if stem in TABLE2_DATASETS else None


def probe_averages(rows: List[Dict[str, Any]], variants: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(average over the paper's Table 2 datasets, average over the other datasets), per feature variant.

    The paper's average covers its five Table 2 datasets; a run with more (e.g. ChestMNIST, a CSV task) reports
    those separately instead of mixing them into the number printed beside the paper's. Each entry:
    ``datasets`` (count), ``names``, ``map``, ``auc`` (means of the rows' peaks, None when no dataset) and
    ``map_two_class`` (the same mean with binary tasks' two-class mean AP in place of the positive-class AP).
    """
    def mean_of(chosen, key):
        return float(np.mean([r[key] for r in chosen])) if chosen else None

    def summary(chosen):
        two_class = [dict(r, best_map=r["best_map_two_class"]) if r.get("num_classes") == 2 and r["task"] == MULTI_CLASS
                     else r for r in chosen]
        return {"datasets": len(chosen), "names": [r["dataset"] for r in chosen], "map": mean_of(chosen, "best_map"),
                "auc": mean_of(chosen, "best_auc"), "map_two_class": mean_of(two_class, "best_map")}

    table2, other = {}, {}
    for variant in variants:
        chosen = [r for r in rows if r["features"] == variant]
        table2[variant] = summary([r for r in chosen if table2_dataset(r["dataset"])])
        extras = [r for r in chosen if not table2_dataset(r["dataset"])]
        if extras:
            other[variant] = summary(extras)
    return table2, other


def to_markdown(rows: List[Dict[str, Any]], averages: Dict[str, Dict[str, Any]], info: Dict[str, Any],
                other_averages: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    lines = [f"# Linear probe — {info['tokenizer']['source']}", ""]
    for warning in info["warnings"]:
        lines += [f"> **WARNING: {warning}.**", ""]
    protocol = info["settings"]
    lines += [f"Frozen tokenizer at {protocol['img_size']} px; one linear layer, Adam lr {protocol['lr']}, batch "
              f"{protocol['batch_size']}, {protocol['epochs']} epochs; peak test mAP / AUC over epochs (%). "
              f"Paper: {PAPER}, Table 2 (average over {', '.join(TABLE2_DATASETS)}).", ""]
    table = [[r["dataset"], r["features"], r["feature_dim"], _task_label(r), r["n_train"], r["n_test"], r["best_map"],
              r["best_map_epoch"], r.get("best_map_two_class"), r["best_auc"], r["best_auc_epoch"], r["acc_at_best_auc"],
              r.get("val_selected_auc"), r.get("val_selected_map")] for r in rows]
    for variant, average in averages.items():
        table.append([f"**average ({average['datasets']} of Table 2's {len(TABLE2_DATASETS)} datasets)**", variant, "",
                      "", "", "", average["map"], "", average["map_two_class"], average["auc"], "", "", None, None])
    table.append(["paper MedITok (Table 2 average)", "grid", "", "", "", "", TABLE2_MEDITOK_AVERAGE["map"], "", None,
                  TABLE2_MEDITOK_AVERAGE["auc"], "", "", None, None])
    for variant, average in (other_averages or {}).items():
        table.append([f"average of the other {average['datasets']} dataset(s), not in the paper's average", variant,
                      "", "", "", "", average["map"], "", average["map_two_class"], average["auc"], "", "", None, None])
    lines += [markdown_table(["dataset", "features", "dim", "task", "train", "test", "best mAP", "epoch",
                              "best mAP 2-class", "best AUC", "epoch", "ACC at best AUC", "AUC at best val",
                              "mAP at best val"], table), ""]
    lines += ["Binary tasks: mAP is the AP of the positive class (label 1); 'mAP 2-class' is the mean AP over both "
              "classes (in the average rows: the same average with that value for binary tasks).", ""]
    if other_averages:
        names = sorted({n for a in other_averages.values() for n in a["names"]})
        lines += [f"The average rows over Table 2's datasets leave out {', '.join(names)} (not in the paper's Table 2); "
                  f"they are averaged separately.", ""]
    missing = [d for d in TABLE2_DATASETS if d not in {table2_dataset(r["dataset"]) for r in rows}]
    if missing:
        lines += [f"The paper's average covers {', '.join(TABLE2_DATASETS)}; missing here: {', '.join(missing)}, so "
                  f"the averages are not directly comparable.", ""]
    for note in info["notes"]:
        lines += [f"- {note}"]
    lines += ["", "## Protocol", ""] + [f"- **{k}**: {v}" for k, v in PROTOCOL.items()]
    lines += ["- **features**: grid = quantised token grid flattened (L×64); pooled = post-quantisation tokens "
              "averaged over the grid (vit_width)", ""]
    return "\n".join(lines)


def _task_label(row: Dict[str, Any]) -> str:
    return "binary" if row["task"] == MULTI_CLASS and row.get("num_classes") == 2 else row["task"]
