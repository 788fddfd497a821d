"""Token caches: round trip against img_to_idx, resume after a crash, refusing mixed or broken caches."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

import meditok
from generation.token_cache import (CHUNKS_DIR, IDS_FILE, MANIFEST_FILE, TokenCache, TokenCacheError,
                                    check_same_tokenizer, csv_source, open_caches, tokenizer_fingerprint,
                                    write_token_cache)
from meditok.data import eval_transform, read_image

IMG = 32  # 2 × 2 token grid: enough to test the layout, cheap on 2 CPU cores
LABELS = ["fundus", "ct_like", "fundus", "pathology", "ct_like"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return meditok.build_meditok("tiny").eval()


@pytest.fixture(scope="module")
def other_tokenizer():
    torch.manual_seed(1)
    return meditok.build_meditok("tiny").eval()


def write_dataset(folder, labels=LABELS):
    """Small RGB PNGs (smooth random patterns, 40 × 48 so the resize + centre crop is exercised) and a CSV."""
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(labels):
        coarse = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((48, 40), Image.BILINEAR).save(folder / f"img{i}.png")
        rows.append({"identifier": f"img{i}.png", "caption": f"image {i}", "modality": label})
    path = folder / "meta.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["identifier", "caption", "modality"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def reference_ids(model, folder, count, flip=False):
    """Ids computed directly: read_image → eval_transform → img_to_idx (the path a user would write)."""
    images = torch.stack([eval_transform(IMG)(read_image(folder / f"img{i}.png")) for i in range(count)])
    if flip:
        images = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
    with torch.no_grad():
        return model.img_to_idx(images)


def make_cache(model, folder, out, **kwargs):
    csv_path = folder / "meta.csv" if (folder / "meta.csv").exists() else write_dataset(folder)
    source = csv_source(csv_path, folder, IMG)
    return write_token_cache(model, source, out, img_size=IMG, batch_size=2, chunk_size=2, progress=False, **kwargs)


def test_round_trip_equals_img_to_idx_with_labels_and_flip(tokenizer, tmp_path):
    out = make_cache(tokenizer, tmp_path, tmp_path / "cache", flip=True)
    cache = TokenCache(out)
    expected = reference_ids(tokenizer, tmp_path, len(LABELS), flip=True)
    assert len(cache) == 2 * len(LABELS) and cache.grid == (2, 2)
    assert cache.ids.dtype == np.uint16 and cache.ids.shape == (2 * len(LABELS), 8, 4)
    got = torch.stack([cache[i]["ids"] for i in range(len(cache))])
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    names = sorted(set(LABELS))
    assert cache.label_names == names
    assert [cache[i]["label"] for i in range(len(cache))] == [names.index(l) for l in LABELS for _ in range(2)]
    assert cache[3]["caption"] == "image 1" and cache[3]["modality"] == "ct_like"
    assert cache.fingerprint == tokenizer_fingerprint(tokenizer)
    assert cache.manifest["counts_per_label"] == {n: 2 * LABELS.count(n) for n in names}
    ids, labels = cache.batch([4, 0, 9])
    assert torch.equal(ids, expected[[4, 0, 9]]) and labels.tolist() == [cache[i]["label"] for i in (4, 0, 9)]


class CrashAfter(torch.utils.data.Dataset):
    """Wraps a dataset; raises when an index >= limit is read (a kill in the middle), counts reads."""

    def __init__(self, dataset, limit):
        self.dataset, self.limit, self.reads = dataset, limit, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index >= self.limit:
            raise KeyboardInterrupt("simulated kill")
        self.reads.append(index)
        return self.dataset[index]


def test_resume_keeps_finished_chunks_and_matches_an_uninterrupted_run(tokenizer, tmp_path):
    csv_path = write_dataset(tmp_path)
    source = csv_source(csv_path, tmp_path, IMG)
    crashing = CrashAfter(source.dataset, limit=3)
    source.dataset = crashing
    with pytest.raises(KeyboardInterrupt):
        write_token_cache(tokenizer, source, tmp_path / "cache", img_size=IMG, batch_size=2, chunk_size=2, progress=False)
    assert (tmp_path / "cache" / CHUNKS_DIR / "chunk-000000.npy").is_file()
    assert not (tmp_path / "cache" / MANIFEST_FILE).exists()
    with pytest.raises(TokenCacheError, match="unfinished"):
        TokenCache(tmp_path / "cache")
    resumed = CrashAfter(crashing.dataset, limit=len(LABELS))
    source.dataset = resumed
    write_token_cache(tokenizer, source, tmp_path / "cache", img_size=IMG, batch_size=2, chunk_size=2, progress=False)
    assert sorted(resumed.reads) == [2, 3, 4], "finished chunk 0 (images 0, 1) must not be read again"
    fresh = make_cache(tokenizer, tmp_path, tmp_path / "fresh")
    assert np.array_equal(np.asarray(TokenCache(tmp_path / "cache").ids), np.asarray(TokenCache(fresh).ids))
    assert not (tmp_path / "cache" / CHUNKS_DIR).exists()


def test_another_tokenizer_is_refused_everywhere(tokenizer, other_tokenizer, tmp_path):
    first = TokenCache(make_cache(tokenizer, tmp_path, tmp_path / "a"))
    second = TokenCache(make_cache(other_tokenizer, tmp_path, tmp_path / "b"))
    with pytest.raises(TokenCacheError) as error:
        check_same_tokenizer(first, second)
    assert first.fingerprint[:16] in str(error.value) and second.fingerprint[:16] in str(error.value)
    with pytest.raises(TokenCacheError, match="different tokenizers"):
        open_caches([tmp_path / "a", tmp_path / "b"])
    # Writing into a folder holding another tokenizer's cache is refused too (both fingerprints named).
    with pytest.raises(TokenCacheError) as error:
        make_cache(other_tokenizer, tmp_path, tmp_path / "a")
    assert first.fingerprint[:16] in str(error.value) and second.fingerprint[:16] in str(error.value)


def test_unseen_label_values_are_named(tokenizer, tmp_path):
    with pytest.raises(TokenCacheError, match=r"\['pathology'\]"):
        make_cache(tokenizer, tmp_path, tmp_path / "c", label_names=["ct_like", "fundus"])
    cache_path = make_cache(tokenizer, tmp_path, tmp_path / "d")
    with pytest.raises(TokenCacheError, match=r"pathology"):
        TokenCache(cache_path, label_names=["ct_like", "fundus", "xray"])
    remapped = TokenCache(cache_path, label_names=["xray", "pathology", "fundus", "ct_like"])
    assert [remapped.label_names[remapped[i]["label"]] for i in range(len(LABELS))] == LABELS


def test_truncated_and_empty_caches_name_the_file(tokenizer, tmp_path):
    path = make_cache(tokenizer, tmp_path, tmp_path / "cache")
    ids_file = path / IDS_FILE
    data = ids_file.read_bytes()
    ids_file.write_bytes(data[: len(data) - 10])
    with pytest.raises(TokenCacheError, match=str(ids_file)):
        TokenCache(path)
    import json

    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["ids_shape"][0] = 0
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TokenCacheError, match="empty"):
        TokenCache(path)
    with pytest.raises(TokenCacheError, match=str(tmp_path / "nowhere")):
        TokenCache(tmp_path / "nowhere")


def test_ranks_write_their_chunks_and_rank0_assembles_the_same_cache(tokenizer, tmp_path):
    """What torchrun does, run one rank after the other: rank 1 tokenizes chunks 1, 3...; rank 0 the rest and
    assembles. The result equals a one-process cache; running again on a finished cache reads nothing."""
    csv_path = write_dataset(tmp_path)
    for rank in (1, 0):
        source = csv_source(csv_path, tmp_path, IMG)
        write_token_cache(tokenizer, source, tmp_path / "ranks", img_size=IMG, batch_size=2, chunk_size=2,
                          progress=False, rank=rank, world_size=2)
    single = make_cache(tokenizer, tmp_path, tmp_path / "single")
    assert np.array_equal(np.asarray(TokenCache(tmp_path / "ranks").ids), np.asarray(TokenCache(single).ids))
    assert (tmp_path / "ranks" / "meta.csv").read_text() == (single / "meta.csv").read_text()
    source = csv_source(csv_path, tmp_path, IMG)
    source.dataset = CrashAfter(source.dataset, limit=0)   # any read would raise
    write_token_cache(tokenizer, source, tmp_path / "ranks", img_size=IMG, batch_size=2, chunk_size=2, progress=False)


def test_shards_folder_and_medmnist_sources_give_the_ids_of_their_images(tokenizer, tmp_path):
    from meditok.data import write_shards
    from generation.token_cache import folder_source, medmnist_source, shards_source

    csv_path = write_dataset(tmp_path)
    expected = reference_ids(tokenizer, tmp_path, len(LABELS))
    # webdataset shards written by the project's converter, two shards
    write_shards(csv_path, tmp_path / "shards", root=tmp_path, shard_size=3)
    source = shards_source(str(tmp_path / "shards"), IMG)
    assert source.labels == LABELS
    cache = TokenCache(write_token_cache(tokenizer, source, tmp_path / "from_shards", img_size=IMG, batch_size=2,
                                         chunk_size=2, progress=False))
    assert torch.equal(torch.stack([cache[i]["ids"] for i in range(len(cache))]), expected)
    # a folder with one sub-folder per label
    for i, label in enumerate(LABELS):
        (tmp_path / "folder" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "img{}.png".format(i)).rename(tmp_path / "folder" / label / f"img{i}.png")
    source = folder_source(tmp_path / "folder", IMG)
    cache = TokenCache(write_token_cache(tokenizer, source, tmp_path / "from_folder", img_size=IMG, progress=False))
    order = [int(name.split("img")[1].split(".")[0]) for name in cache.identifiers]
    assert torch.equal(torch.stack([cache[i]["ids"] for i in range(len(cache))]), expected[order])
    assert [cache.modalities[i] for i in range(len(cache))] == [LABELS[j] for j in order]
    # MedMNIST .npz: grayscale uint8 [N, 28, 28]; label = subset name
    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=pixels, train_labels=np.zeros((3, 1)))
    source = medmnist_source([tmp_path / "pneumoniamnist.npz"], "train", IMG)
    cache = TokenCache(write_token_cache(tokenizer, source, tmp_path / "from_npz", img_size=IMG, progress=False))
    images = torch.stack([eval_transform(IMG)(torch.from_numpy(p).float().div(127.5).sub(1)[None].expand(3, -1, -1))
                          for p in pixels])
    with torch.no_grad():
        assert torch.equal(torch.stack([cache[i]["ids"] for i in range(3)]), tokenizer.img_to_idx(images))
    assert cache.label_names == ["pneumoniamnist"]
    with pytest.raises(TokenCacheError, match="val_images"):
        medmnist_source([tmp_path / "pneumoniamnist.npz"], "val", IMG)
