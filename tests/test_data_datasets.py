"""CSVImageDataset and ShardedImageDataset on the committed example set and on broken CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from meditok.data import (
    CSVImageDataset,
    MedicalImageError,
    ShardedImageDataset,
    eval_transform,
    read_ct_hu,
    read_image,
    write_shards,
)
from meditok.data.samples import BAD_SAMPLES_COLUMNS, BAD_SAMPLES_FILE

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "datasets" / "examples"
TRAIN_CSV = REPO / "datasets" / "meta" / "examples_train.csv"
VAL_CSV = REPO / "datasets" / "meta" / "examples_val.csv"


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def char_tokenizer(text: str) -> torch.Tensor:
    """A stand-in tokenizer with open_clip's output shape [1, context]."""
    codes = [ord(c) % 1000 for c in text[:12]]
    return torch.tensor([codes + [0] * (12 - len(codes))], dtype=torch.long)


def write_csv(path: Path, header: list[str], rows: list[list[str]], sep: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_dataset_yields_image_modality_caption_and_text():
    rows = csv_rows(VAL_CSV)
    dataset = CSVImageDataset(
        VAL_CSV, root=EXAMPLES, transform=eval_transform(32), tokenizer=char_tokenizer
    )
    assert len(dataset) == len(rows)
    for index, row in enumerate(rows):
        sample = dataset[index]
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert -1 <= sample["image"].min() and sample["image"].max() <= 1
        assert (sample["modality"], sample["caption"]) == (row["modality"], row["caption"])
        assert (sample["identifier"], sample["index"]) == (row["identifier"], index)
        assert torch.equal(sample["text"], char_tokenizer(row["caption"])[0])
        untransformed = read_image(EXAMPLES / row["identifier"], row["modality"])
        torch.testing.assert_close(sample["image"], eval_transform(32)(untransformed))


def test_ct_rows_hand_hounsfield_units_to_the_window():
    seen = []

    def recording_window(hu: torch.Tensor) -> torch.Tensor:
        seen.append(hu.clone())
        return torch.zeros(3, *hu.shape[-2:])

    dataset = CSVImageDataset(VAL_CSV, root=EXAMPLES, ct_window=recording_window)
    ct_rows = [i for i, r in enumerate(csv_rows(VAL_CSV)) if r["modality"] == "ct"]
    assert ct_rows
    sample = dataset[ct_rows[0]]
    assert len(seen) == 1 and torch.equal(sample["image"], torch.zeros_like(sample["image"]))
    torch.testing.assert_close(seen[0], read_ct_hu(EXAMPLES / sample["identifier"]))
    assert seen[0].min() < -500  # HU, not an image in [-1, 1]


def test_column_names_and_separator_are_configurable(tmp_path):
    row = csv_rows(VAL_CSV)[1]
    table = write_csv(
        tmp_path / "custom.tsv",
        ["path", "text", "kind"],
        [[str(EXAMPLES / row["identifier"]), row["caption"], row["modality"]]],
        sep="\t",
    )
    dataset = CSVImageDataset(
        table, image_column="path", caption_column="text", modality_column="kind", sep="\t"
    )
    assert dataset[0]["caption"] == row["caption"] and dataset[0]["modality"] == row["modality"]


def test_csv_without_a_required_column_names_the_file_and_the_column(tmp_path):
    table = write_csv(tmp_path / "meta.csv", ["identifier", "caption"], [["a.png", "x"]])
    with pytest.raises(MedicalImageError, match=f"{table}: missing required column.*'modality'"):
        CSVImageDataset(table)
    with pytest.raises(MedicalImageError, match="missing required column.*'caption'"):
        write_csv(table, ["identifier", "modality"], [["a.png", "ct"]])
        CSVImageDataset(table, tokenizer=char_tokenizer)


@pytest.fixture
def broken_csv(tmp_path) -> Path:
    """Rows: good, missing file, good, 8-bit PNG on a ct row (last, so 'skip' wraps around)."""
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(tmp_path / "eight_bit.png")
    good = csv_rows(VAL_CSV)
    return write_csv(
        tmp_path / "broken.csv",
        ["identifier", "caption", "modality"],
        [
            [str(EXAMPLES / good[1]["identifier"]), "a", good[1]["modality"]],
            [str(tmp_path / "missing.png"), "b", "mri"],
            [str(EXAMPLES / good[3]["identifier"]), "c", good[3]["modality"]],
            [str(tmp_path / "eight_bit.png"), "d", "ct"],
        ],
    )


def test_fail_fast_names_the_file_and_csv_line(broken_csv, tmp_path):
    dataset = CSVImageDataset(broken_csv)
    assert dataset[0]["caption"] == "a"
    with pytest.raises(MedicalImageError) as caught:
        dataset[1]
    message = str(caught.value)
    assert (
        f"{tmp_path / 'missing.png'}: file not found" in message
        and f"{broken_csv} line 3" in message
    )
    with pytest.raises(
        MedicalImageError, match=r"eight_bit.png: modality 'ct' needs Hounsfield.*line 5"
    ):
        dataset[3]


def test_skip_replaces_by_the_next_row_counts_and_logs(broken_csv, tmp_path):
    log_dir = tmp_path / "run"
    dataset = CSVImageDataset(broken_csv, on_error="skip", error_log_dir=log_dir)
    replaced = dataset[1]
    assert (replaced["caption"], replaced["index"], replaced["bad_samples_skipped"]) == ("c", 2, 1)
    wrapped = dataset[3]
    assert (wrapped["caption"], wrapped["index"], wrapped["bad_samples_skipped"]) == ("a", 0, 1)
    assert dataset[0]["bad_samples_skipped"] == 0
    assert dataset.bad_sample_count == 2
    logged = csv_rows(log_dir / BAD_SAMPLES_FILE)
    assert list(logged[0]) == list(BAD_SAMPLES_COLUMNS)
    logged_files = [(r["line_or_key"], Path(r["path"]).name) for r in logged]
    assert logged_files == [("3", "missing.png"), ("5", "eight_bit.png")]


def test_skip_counts_are_visible_through_dataloader_workers(broken_csv):
    dataset = CSVImageDataset(broken_csv, transform=eval_transform(16), on_error="skip")
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    skipped = sum(int(batch["bad_samples_skipped"].sum()) for batch in loader)
    assert (
        skipped == 2
    )  # each bad row replaced once; the workers' own counters are not visible here


def test_skip_gives_up_when_every_row_is_bad(tmp_path):
    table = write_csv(
        tmp_path / "bad.csv",
        ["identifier", "caption", "modality"],
        [[str(tmp_path / f"missing{i}.png"), "", "mri"] for i in range(3)],
    )
    with pytest.raises(MedicalImageError, match="3 consecutive bad rows"):
        CSVImageDataset(table, on_error="skip")[0]


# ----- shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(TRAIN_CSV, out, EXAMPLES, shard_size=3)
    return out


def test_converter_writes_every_row_and_an_index(shard_dir):
    rows = csv_rows(TRAIN_CSV)
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["num_samples"] == len(rows)
    sizes = [s["num_samples"] for s in index["shards"]]
    assert sizes == [3] * (len(rows) // 3) + ([len(rows) % 3] if len(rows) % 3 else [])
    samples = list(ShardedImageDataset(shard_dir, tokenizer=char_tokenizer))
    assert [s["identifier"] for s in samples] == [r["identifier"] for r in rows]
    for sample, row in zip(samples, rows):
        assert sample["caption"] == row["caption"] and sample["modality"] == row["modality"]
        torch.testing.assert_close(
            sample["image"], read_image(EXAMPLES / row["identifier"], row["modality"])
        )
        assert torch.equal(sample["text"], char_tokenizer(row["caption"])[0])


def test_shards_split_disjointly_across_ranks_and_workers(shard_dir):
    seen_by_rank = []
    for rank in range(2):
        dataset = ShardedImageDataset(
            shard_dir, transform=eval_transform(16), rank=rank, world_size=2
        )
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        seen_by_rank.append([sample["identifier"] for sample in loader])
    everything = [r["identifier"] for r in csv_rows(TRAIN_CSV)]
    assert not set(seen_by_rank[0]) & set(seen_by_rank[1])
    assert sorted(seen_by_rank[0] + seen_by_rank[1]) == sorted(everything)


def test_shard_shuffle_is_seeded_by_epoch(shard_dir):
    def order(epoch: int, seed: int = 0) -> list[str]:
        dataset = ShardedImageDataset(shard_dir, shuffle=True, shuffle_buffer=8, seed=seed)
        dataset.set_epoch(epoch)
        return [s["identifier"] for s in dataset]

    first = order(0)
    assert order(0) == first
    assert order(1) != first and sorted(order(1)) == sorted(first)


def test_too_few_shards_for_the_ranks_is_an_error(shard_dir):
    dataset = ShardedImageDataset(shard_dir, rank=0, world_size=100)
    with pytest.raises(ValueError, match="cannot feed 100 ranks"):
        next(iter(dataset))


def test_converter_policy_for_bad_rows(broken_csv, tmp_path):
    with pytest.raises(MedicalImageError, match=r"missing.png: file not found.*line 3"):
        write_shards(broken_csv, tmp_path / "strict")
    summary = write_shards(broken_csv, tmp_path / "lenient", on_error="skip")
    assert (summary["num_samples"], summary["skipped"]) == (2, 2)
    assert len(csv_rows(tmp_path / "lenient" / BAD_SAMPLES_FILE)) == 2
