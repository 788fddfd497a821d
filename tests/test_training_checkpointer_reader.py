"""training.checkpointer.CheckpointReader on a folder a trainer may hold: samplers and evaluators skip unusable
files without renaming anything; the trainer's side sets them aside."""
import pytest
import torch

from training.checkpoint_files import atomic_torch_save
from training.checkpointer import CheckpointReader, checkpoint_path


def write_run(run):
    run.mkdir()
    atomic_torch_save({"format": "f", "model": {"w": torch.ones(2)}, "step": 1}, checkpoint_path(run, 1))
    atomic_torch_save({"format": "f", "model": {"w": torch.tensor([float("nan"), 0.0])}, "step": 2},
                      checkpoint_path(run, 2))


def test_a_reader_for_inference_skips_unusable_files_and_changes_nothing(tmp_path):
    write_run(tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*ckpt-00000002.pth: 1 tensors hold NaN/Inf"):
        ckpt = CheckpointReader(tmp_path / "run", ("f",), "test", set_aside_unusable=False).newest_usable()
    assert ckpt["step"] == 1 and sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_the_trainers_reader_sets_them_aside(tmp_path):
    write_run(tmp_path / "run")
    with pytest.warns(UserWarning, match="setting aside"):
        assert CheckpointReader(tmp_path / "run", ("f",), "test").newest_usable()["step"] == 1
    assert (tmp_path / "run" / "ckpt-00000002.pth.unusable").exists()


def test_the_run_folders_args_json_is_what_checkpoints_record(tmp_path):
    import json
    from training.checkpointer import Checkpointer
    checkpointer = Checkpointer(tmp_path / "run", "", 2, "f", "test", args={"lr": 0.5, "out": str(tmp_path / "run")})
    checkpointer.write_args()
    checkpointer.close()
    assert json.loads((tmp_path / "run" / "args.json").read_text()) == {"lr": 0.5, "out": str(tmp_path / "run")}
