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


def test_skip_replaces_by_a_readable_row_counts_and_logs(broken_csv, tmp_path):
    log_dir = tmp_path / "run"
    dataset = CSVImageDataset(broken_csv, on_error="skip", error_log_dir=log_dir, replacement_seed=0)
    readable = {0: "a", 2: "c"}
    replaced = dataset[1]
    assert replaced["index"] in readable and replaced["caption"] == readable[replaced["index"]]
    assert replaced["bad_samples_skipped"] >= 1
    again = dataset[3]
    assert again["index"] in readable and again["bad_samples_skipped"] >= 1
    assert dataset[0]["bad_samples_skipped"] == 0
    bad_draws = replaced["bad_samples_skipped"] + again["bad_samples_skipped"]
    assert dataset.bad_sample_count == bad_draws
    logged = csv_rows(log_dir / BAD_SAMPLES_FILE)
    assert list(logged[0]) == list(BAD_SAMPLES_COLUMNS)
    assert len(logged) == bad_draws
    assert {(r["line_or_key"], Path(r["path"]).name) for r in logged} == {
        ("3", "missing.png"),
        ("5", "eight_bit.png"),
    }


def _block_csv(tmp_path, n_bad: int = 6) -> Path:
    """Three readable 8x8 PNGs (rows 0, 7, 8) around a block of `n_bad` missing files (rows 1..n_bad)."""
    rows = []
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"good{i}.png")
    rows.append([str(tmp_path / "good0.png"), "g0", "mri"])
    rows += [[str(tmp_path / f"missing{i}.png"), f"b{i}", "mri"] for i in range(n_bad)]
    rows += [[str(tmp_path / f"good{i}.png"), f"g{i}", "mri"] for i in (1, 2)]
    return write_csv(tmp_path / "block.csv", ["identifier", "caption", "modality"], rows)


def test_skip_draws_the_replacement_uniformly_among_readable_rows(tmp_path):
    """A block of 6 bad rows must not hand its 6 draws to the row after it (the old 'next row' rule)."""
    table = _block_csv(tmp_path)
    bad_rows = range(1, 7)
    counts = {0: 0, 7: 0, 8: 0}
    dataset = CSVImageDataset(table, on_error="skip")
    for seed in range(30):
        torch.manual_seed(seed)  # what per-sample seeding does before each sample
        for row in bad_rows:
            counts[dataset[row]["index"]] += 1
    # 180 draws over 3 readable rows: 60 each expected, binomial sd ~6.3; the 'next row' rule gives 0/180/0.
    assert all(35 <= n <= 85 for n in counts.values()), counts


def test_skip_replacements_are_reproducible_from_the_seed_and_index(tmp_path):
    table = _block_csv(tmp_path)

    def replacements(**kwargs):
        dataset = CSVImageDataset(table, on_error="skip", **kwargs)
        return [(dataset[i]["index"], dataset[i]["bad_samples_skipped"]) for i in range(len(dataset))]

    first = replacements(replacement_seed=3)
    assert replacements(replacement_seed=3) == first  # same seed: same draws, in any order of reading
    assert [i for i, _ in first][0] == 0 and [s for _, s in first][7:] == [0, 0]
    assert any(replacements(replacement_seed=s) != first for s in (4, 5, 6))
    # Without a seed: torch's seed of the reading process (what per-sample seeding sets) decides.
    torch.manual_seed(11)
    under_seed_11 = replacements()
    torch.manual_seed(11)
    assert replacements() == under_seed_11


def test_skip_counts_are_visible_through_dataloader_workers(broken_csv):
    dataset = CSVImageDataset(
        broken_csv, transform=eval_transform(16), on_error="skip", replacement_seed=1
    )
    in_process = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    skipped = sum(int(batch["bad_samples_skipped"].sum()) for batch in batches)
    # each bad row is counted with every bad draw it took; the same draws in workers as in this process
    assert skipped == sum(s["bad_samples_skipped"] for s in in_process) >= 2
    assert torch.cat([b["index"] for b in batches]).tolist() == [s["index"] for s in in_process]


def test_skip_gives_up_when_every_row_is_bad(tmp_path):
    table = write_csv(
        tmp_path / "bad.csv",
        ["identifier", "caption", "modality"],
        [[str(tmp_path / f"missing{i}.png"), "", "mri"] for i in range(3)],
    )
    with pytest.raises(MedicalImageError, match="3 bad rows in a row for sample 0"):
        CSVImageDataset(table, on_error="skip")[0]


def test_skip_policy_handles_nan_volumes_and_decompression_bombs(tmp_path, monkeypatch):
    """Corrupt values and decoder failures reach the skip policy as MedicalImageError, naming the file."""
    import nibabel as nib

    volume = np.full((16, 16, 3), 40.0, dtype=np.float32)
    volume[4:8, 4:8, :] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "nan_ct.nii.gz"))
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "bomb.png")
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(tmp_path / "small.png")
    table = write_csv(
        tmp_path / "corrupt.csv",
        ["identifier", "caption", "modality"],
        [
            [str(tmp_path / "nan_ct.nii.gz"), "n", "ct"],
            [str(tmp_path / "bomb.png"), "b", "xray"],
            [str(tmp_path / "small.png"), "s", "xray"],
        ],
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # bomb.png's 1024 pixels > 2 x the limit
    strict = CSVImageDataset(table)
    with pytest.raises(MedicalImageError, match=r"nan_ct.nii.gz: 16 of 256 pixel values are not finite.*line 2"):
        strict[0]
    with pytest.raises(MedicalImageError, match=r"bomb.png: too large to decode safely.*line 3"):
        strict[1]
    lenient = CSVImageDataset(table, on_error="skip", error_log_dir=tmp_path / "run")
    for index in (0, 1):
        sample = lenient[index]
        assert sample["index"] == 2 and sample["bad_samples_skipped"] >= 1
        assert torch.isfinite(sample["image"]).all()
    reasons = [r["reason"] for r in csv_rows(tmp_path / "run" / BAD_SAMPLES_FILE)]
    assert any("not finite" in r for r in reasons) and any("too large" in r for r in reasons)


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


def test_stream_epoch_is_not_held_back_by_a_worker_without_shards():
    """With more DataLoader workers than a rank has shards, a worker reads nothing: the epoch is the one every
    reading worker has reached (it stayed 0 for ever before)."""
    from meditok.data.shards import StreamPosition

    def batch(worker, epoch, position):
        return {"stream_position": torch.tensor([[worker, epoch, position]])}

    position = StreamPosition(num_workers=3)  # worker 2 has no shard
    assert position.epoch == 0
    for worker, epoch, read in ((0, 0, 4), (1, 0, 4), (0, 1, 2), (1, 0, 8)):
        position.update(batch(worker, epoch, read))
    assert position.epoch == 0  # worker 1 is still in its first pass
    position.update(batch(1, 1, 1))
    assert position.epoch == 1
    again = StreamPosition.from_state(position.state_dict())  # through a checkpoint
    assert again.epoch == 1 and again.workers == position.workers
