"""The linear probe itself: one linear layer trained on frozen features, test (and val) metrics after every epoch.

:func:`train_linear_probe` returns a :class:`ProbeResult` with the per-epoch history and the peak test mAP /
AUC with their epochs; :func:`predict` gives the float64 per-class log-odds the metrics are computed from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from .metrics import class_log_odds, classification_metrics
from .probe_data import MULTI_CLASS, MULTI_LABEL
from .probe_features import FeatureTable
from .progress import progress_options


@dataclass
class ProbeResult:
    history: List[Dict[str, Any]]
    best_map: Dict[str, Any]
    best_auc: Dict[str, Any]
    best_map_two_class: Dict[str, Any]  # binary tasks: peak of the two-class mean AP (NaN values otherwise)
    val_selected: Optional[Dict[str, Any]]
    final: Dict[str, Any]
    feature_dim: int
    seconds: float


@torch.no_grad()
def predict(layer: torch.nn.Linear, features: FeatureTable, task: str, batch_size: int = 1024) -> np.ndarray:
    """Per-class log-odds [N, C], float64 (:func:`evaluation.metrics.class_log_odds` of the layer's logits).

    The logits are computed in float64 too: float32 softmax probabilities tie at exactly 1.0 for confident
    predictions, which lowered the AUC of a perfectly ranked test set (100 % scored as 75 %).
    """
    device = layer.weight.device
    weight, bias = layer.weight.double(), layer.bias.double()
    logits = []
    for start in range(0, len(features), batch_size):
        rows = features.rows(torch.arange(start, min(start + batch_size, len(features)), device=device))
        logits.append(torch.nn.functional.linear(rows.double(), weight, bias).cpu())
    return class_log_odds(torch.cat(logits), task)


def train_linear_probe(train: FeatureTable, train_labels: np.ndarray, test: FeatureTable, test_labels: np.ndarray, *,
                       task: str, num_classes: int, epochs: int = 100, lr: float = 1e-4, batch_size: int = 128,
                       seed: int = 0, device: str = "cpu", val: Optional[FeatureTable] = None,
                       val_labels: Optional[np.ndarray] = None, progress: bool = True, desc: str = "probe") -> ProbeResult:
    """Train one linear layer on frozen features; evaluate the test (and val) split after every epoch.

    Args:
        train, test, val: feature rows [N, D]. *_labels: multi-class [N] ints in [0, num_classes);
            multi-label [N, num_classes] 0/1.
        task: 'multi-class' or 'multi-label'.

    Returns:
        :class:`ProbeResult` with per-epoch history and the peak test mAP / AUC (in %) with their epochs.
    """
    if task not in (MULTI_CLASS, MULTI_LABEL):
        raise ValueError(f"task must be {MULTI_CLASS!r} or {MULTI_LABEL!r}, got {task!r}")
    started = time.perf_counter()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    train, test = train.to(device), test.to(device)
    val = val.to(device) if val is not None else None
    layer = torch.nn.Linear(train.dim, num_classes).to(device)
    # Start from zero: the problem is convex, and a random start would add a seed-dependent detour that
    # at lr 1e-4 takes many epochs to undo (a random layer can rank a class exactly backwards).
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    if task == MULTI_CLASS:
        targets = torch.as_tensor(np.asarray(train_labels).reshape(-1), dtype=torch.long, device=device)
        loss_fn = torch.nn.CrossEntropyLoss()
    else:
        targets = torch.as_tensor(np.asarray(train_labels), dtype=torch.float32, device=device)
        loss_fn = torch.nn.BCEWithLogitsLoss()
    history = []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress, **progress_options())
    for epoch in bar:
        layer.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(layer(train.rows(index)), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(index)
        layer.eval()
        record = {"epoch": epoch, "train_loss": total_loss / len(order)}
        record.update({f"test_{k}": v for k, v in classification_metrics(task, test_labels, predict(layer, test, task)).items()})
        if val is not None:
            record.update({f"val_{k}": v for k, v in classification_metrics(task, val_labels, predict(layer, val, task)).items()})
        history.append(record)
        bar.set_postfix(auc=f"{record['test_auc']:.2f}", map=f"{record['test_map']:.2f}")

    def best(key):
        finite = [h for h in history if np.isfinite(h[key])]
        return max(finite, key=lambda h: h[key]) if finite else history[-1]

    def metrics_at(record, prefix="test_"):
        return {"epoch": record["epoch"], **{k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}}

    return ProbeResult(
        history=history,
        best_map=metrics_at(best("test_map")),
        best_auc=metrics_at(best("test_auc")),
        best_map_two_class=metrics_at(best("test_map_two_class")),
        val_selected=metrics_at(best("val_auc")) if val is not None else None,
        final=metrics_at(history[-1]),
        feature_dim=train.dim,
        seconds=time.perf_counter() - started,
    )
