"""evaluation.vqa refuses a --vision-tower whose weights differ from the ones the run was trained with
(as generation.sample refuses another tokenizer), unless --allow-other-vision-tower."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import meditok
from interpretation import train as vqa_train
from interpretation.tiny import make_tiny_lm
from interpretation.vision_tower import load_tokenizer_for_tower

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "datasets" / "examples"
ROWS = [("ct/thorax_vertebra.png", "ct", "What imaging modality is this?", "CT", "open"),
        ("mri/mr_small.png", "mri", "Is this an MRI scan?", "yes", "closed")]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-step stage-B run with the default tower random:tiny (seed 0), and two saved towers: the same weights
    (seed 0) in a folder, and other weights of the same architecture (seed 1)."""
    root = tmp_path_factory.mktemp("vqa_tower")
    lm = make_tiny_lm(root / "lm", seed=0, hidden_size=32, num_heads=2)
    qa = root / "qa.csv"
    qa.write_text("image,modality,question,answer,answer_type\n"
                  + "".join(f"{i},{m},{q},{a},{t}\n" for i, m, q, a, t in ROWS))
    run = root / "run"
    summary = vqa_train.train(vqa_train.parse_args([
        "--stage", "B", "--language-model", str(lm), "--data", str(qa), "--image-root", str(EXAMPLES),
        "--out", str(run), "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--lora-r", "2",
        "--lora-alpha", "4", "--device", "cpu", "--warmup-ratio", "0", "--log-every", "1"]))
    assert summary["finished"]
    assert json.loads((run / "interpretation.json").read_text())["vision_tower"] == "random:tiny"
    same, other = root / "tower_seed0", root / "tower_seed1"
    meditok.save_meditok(load_tokenizer_for_tower("random:tiny", seed=0), same)
    meditok.save_meditok(load_tokenizer_for_tower("random:tiny", seed=1), other)
    return {"root": root, "run": run, "qa": qa, "same": same, "other": other}


def evaluate(trained, out, *extra, run=None):
    from evaluation import vqa as vqa_eval

    return vqa_eval.main(["--run", str(run or trained["run"]), "--data", str(trained["qa"]), "--image-root",
                          str(EXAMPLES), "--device", "cpu", "--max-new-tokens", "2", "--out", str(out), *extra])


def edited_run(trained, tmp_path, drop=(), **changes):
    """A copy of the run whose interpretation.json has ``changes`` and lacks the keys in ``drop``."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    description = json.loads((run / "interpretation.json").read_text())
    description.update(changes)
    for key in drop:
        description.pop(key, None)
    (run / "interpretation.json").write_text(json.dumps(description))
    return run


def test_another_vision_tower_is_refused_in_one_line_naming_both(trained, tmp_path):
    with pytest.raises(SystemExit) as error:
        evaluate(trained, tmp_path / "eval", "--vision-tower", str(trained["other"]))
    message = str(error.value)
    assert "\n" not in message and message.startswith("error: ")
    assert f"--vision-tower {trained['other']}" in message          # the one given
    assert "(random:tiny, weights" in message                          # the one the run was trained with
    assert "pass --vision-tower random:tiny" in message and "--allow-other-vision-tower" in message  # the fix
    assert not (tmp_path / "eval").exists()                            # refused before answering anything


def test_the_same_weights_at_another_path_are_accepted(trained, tmp_path, capsys):
    assert evaluate(trained, tmp_path / "eval", "--vision-tower", str(trained["same"])) == 0
    report = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    check = report["run"]["vision_tower_check"]
    assert check["matches"] is True and check["vision_tower"] == str(trained["same"])
    assert check["fingerprint"] == check["trained_fingerprint"]
    assert "warning:" not in capsys.readouterr().err


def test_allow_other_vision_tower_answers_with_a_warning(trained, tmp_path, capsys):
    assert evaluate(trained, tmp_path / "eval", "--vision-tower", str(trained["other"]),
                    "--allow-other-vision-tower") == 0
    err = capsys.readouterr().err
    assert "warning:" in err and str(trained["other"]) in err
    report = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert report["run"]["vision_tower_check"]["matches"] is False
    assert any(str(trained["other"]) in w and "random:tiny" in w for w in report["warnings"])
    assert "--allow-other-vision-tower" in (tmp_path / "eval" / "vqa.md").read_text()


def test_recorded_fingerprint_catches_weights_changed_in_place(trained, tmp_path):
    # A run whose trainer recorded the tower's fingerprint: the recorded tower is checked even without an override.
    run = edited_run(trained, tmp_path, vision_tower=str(trained["same"]), vision_tower_fingerprint="0" * 64)
    with pytest.raises(SystemExit, match=rf"{trained['same']} now holds other weights .* than when "
                                         rf".*interpretation\.json was trained \(0000000000000000\); restore them"):
        evaluate(trained, tmp_path / "eval", run=run)


def test_recorded_fingerprint_is_used_when_the_recorded_tower_is_gone(trained, tmp_path):
    from generation.token_cache import tokenizer_fingerprint

    right = tokenizer_fingerprint(meditok.load_meditok(trained["same"]))
    run = edited_run(trained, tmp_path, vision_tower=str(tmp_path / "moved_away"), vision_tower_fingerprint=right)
    assert evaluate(trained, tmp_path / "ok", "--vision-tower", str(trained["same"]), run=run) == 0
    with pytest.raises(SystemExit, match=r"is not the MedITok .* was trained with .*moved_away"):
        evaluate(trained, tmp_path / "refused", "--vision-tower", str(trained["other"]), run=run)


def test_unverifiable_tower_is_answered_with_a_warning(trained, tmp_path, capsys):
    # a run written before fingerprints were recorded, whose tower file has gone
    run = edited_run(trained, tmp_path, drop=("vision_tower_fingerprint",), vision_tower=str(tmp_path / "moved_away"))
    assert evaluate(trained, tmp_path / "eval", "--vision-tower", str(trained["same"]), run=run) == 0
    assert "cannot check --vision-tower" in capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert report["run"]["vision_tower_check"]["matches"] is None
    assert any("cannot check" in w for w in report["warnings"])
