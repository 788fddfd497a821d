"""A validation / test split that lacks labels (modalities) present in training is flagged in one line naming them:
by generation.tokenize_dataset when it makes a cache with --label-names-from (the CORPUS=1 try-outs' validation
cache) and by scripts/data/build_corpus.py when it writes the splits."""
import csv
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from generation import tokenize_dataset
from generation.token_cache import TokenCache, label_coverage_warning, labels_with_rows

REPO = Path(__file__).resolve().parents[1]
CSV_TRAIN = REPO / "datasets" / "meta" / "examples_train.csv"
ROOT = REPO / "datasets" / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("coverage") / "train"
    assert tokenize_dataset.main(["--random-tokenizer", "tiny", "--csv", str(CSV_TRAIN), "--root", str(ROOT),
                                  "--out", str(out), "--img-size", "16", "--num-workers", "0"]) == 0
    return out


def val_csv(tmp_path, modalities):
    """A validation CSV with the first training image of each of ``modalities``."""
    with open(CSV_TRAIN, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    path = tmp_path / "val.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(next(r for r in rows if r["modality"] == m) for m in modalities)
    return path


def make_val(train_cache, tmp_path, modalities):
    out = tmp_path / "val"
    assert tokenize_dataset.main(["--checkpoint", str(train_cache / "tokenizer"), "--csv",
                                  str(val_csv(tmp_path, modalities)), "--root", str(ROOT), "--out", str(out),
                                  "--img-size", "16", "--num-workers", "0", "--label-names-from",
                                  str(train_cache)]) == 0
    return out


def test_validation_cache_missing_labels_is_warned_in_one_line(train_cache, tmp_path, capsys):
    trained = labels_with_rows(TokenCache(train_cache))
    assert len(trained) >= 4
    capsys.readouterr()
    val = make_val(train_cache, tmp_path, trained[:2])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert f"{val} has rows of 2 of the {len(trained)} labels of {train_cache}" in line
    assert "none of " + ", ".join(trained[2:]) + ";" in line
    assert "cover " + ", ".join(trained[:2]) + " only" in line


def test_validation_cache_with_every_label_is_quiet(train_cache, tmp_path, capsys):
    trained = labels_with_rows(TokenCache(train_cache))
    capsys.readouterr()
    val = make_val(train_cache, tmp_path, trained)
    assert "warning:" not in capsys.readouterr().err
    assert label_coverage_warning(TokenCache(train_cache), TokenCache(val)) is None


def test_corpus_builder_names_the_modalities_a_split_lacks():
    builder = runpy.run_path(str(REPO / "scripts" / "data" / "build_corpus.py"))
    row = lambda kind, split, modality: SimpleNamespace(kind=kind, split=split, modality=modality)  # noqa: E731
    rows = ([row("tiles64", "train", m) for m in ("ct", "mri", "xray", "fundus")]
            + [row("tiles64", "val", "mri")]
            + [row("tiles64", "test", m) for m in ("ct", "mri", "xray", "fundus")]
            + [row("views", s, "ct") for s in ("train", "val", "test")])
    lines = builder["split_coverage_warnings"](rows)
    assert lines == ["warning: tiles64: val has 1 of the 4 training modalities (no ct, fundus, xray): scores on "
                     "those splits leave them out (a modality with one source is train only)"]
