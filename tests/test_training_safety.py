"""Nothing lost when training goes wrong: no checkpoint of non-finite weights, healthy checkpoints never
pruned, one trainer per run folder, stale temp files removed, a full disk reported in one message."""
import errno
import json
import re

import pytest
import torch

import train
from tokenizer_training import checkpointing
from training import checkpointer


def all_finite(path):
    ckpt = checkpointing.load_checkpoint(path)
    return all(torch.isfinite(v).all() for part in ("model", "heads", "disc") if ckpt.get(part)
               for v in ckpt[part].values() if v.is_floating_point())


def test_a_diverging_run_never_saves_non_finite_weights(train_argv, tmp_path, capsys):
    """--lr 1e9 with saves between logging steps: the save refuses the non-finite weights and the message names
    the checkpoint to go back to; --resume auto then continues from a finite checkpoint."""
    import re
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=8, save_every=2, stop_at_step=4, adv_weight=0)) == 0
    capsys.readouterr()
    assert train.main(train_argv(run, max_steps=8, save_every=2, log_every=4, resume="auto", lr=1e9,
                                 adv_weight=0)) == 1  # the stop is one message and exit status 1, no traceback
    message = capsys.readouterr().err
    assert "non-finite" in message and "Traceback" not in message, message
    saved = checkpointing.list_checkpoints(run)
    assert saved and all(all_finite(p) for p in saved)
    named = re.search(r"--resume (\S+?ckpt-\d{8}\.pth)", message)
    assert named and all_finite(named.group(1)), message
    assert train.main(train_argv(run, max_steps=8, save_every=2, resume=named.group(1), adv_weight=0)) == 0
    assert checkpointing.load_checkpoint(checkpointing.list_checkpoints(run)[0])["step"] == 8


def test_nonfinite_steps_can_be_skipped_and_are_counted(train_argv, tmp_path, monkeypatch, capsys):
    """--on-nonfinite skip: a step whose loss is NaN leaves the weights untouched and is reported."""
    from tokenizer_training.trainer import Trainer
    real = Trainer.backward
    calls = {"n": 0}

    def poisoned(self, batch, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step sees a NaN image
            batch = {**batch, "image": batch["image"].clone().fill_(float("nan"))}
        return real(self, batch, *a, **k)
    monkeypatch.setattr(Trainer, "backward", poisoned)
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=3, on_nonfinite="skip", adv_weight=0, lpips_weight=0)) == 0
    assert "1 non-finite step(s) skipped" in capsys.readouterr().out
    assert all_finite(checkpointing.list_checkpoints(run)[0])
    calls["n"] = 0
    capsys.readouterr()
    assert train.main(train_argv(tmp_path / "stop", max_steps=3, adv_weight=0, lpips_weight=0)) == 1  # the default stops
    assert "--on-nonfinite skip" in capsys.readouterr().err


def test_pruning_keeps_the_healthy_checkpoint(tmp_path):
    for step in (15, 20, 22, 24):
        checkpointer.atomic_torch_save({"step": step}, checkpointer.checkpoint_path(tmp_path, step))
    (tmp_path / checkpointer.HEALTHY_FILE).write_text(json.dumps({"checkpoint": "ckpt-00000015.pth"}))
    checkpointer.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == [
        "ckpt-00000024.pth", "ckpt-00000022.pth", "ckpt-00000015.pth"]


def test_a_finite_logged_step_marks_the_checkpoint_before_it_healthy(train_argv, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=5, save_every=2, adv_weight=0, lpips_weight=0)) == 0
    assert checkpointer.healthy_checkpoint(run).name == "ckpt-00000004.pth"


def test_resume_auto_skips_checkpoints_of_non_finite_weights(train_argv, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=4, save_every=2, stop_at_step=2, adv_weight=0, lpips_weight=0)) == 0
    good = checkpointing.load_checkpoint(checkpointing.list_checkpoints(run)[0])
    bad = dict(good)
    bad["model"] = {k: v.clone().fill_(float("nan")) if k.endswith("weight") else v for k, v in good["model"].items()}
    bad["step"] = 3
    checkpointer.atomic_torch_save(bad, checkpointer.checkpoint_path(run, 3))
    with pytest.warns(UserWarning, match=r"setting aside checkpoint .*ckpt-00000003\.pth.*: \d+ tensors hold NaN"):
        found = checkpointing.find_resume_checkpoint(run)
    assert found["step"] == 2 and (run / "ckpt-00000003.pth.unusable").exists()


def test_a_second_trainer_on_a_locked_run_folder_stops_at_once(train_argv, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    first = checkpointer.RunFolderLock(run)  # a trainer holding the folder
    try:
        assert train.main(train_argv(run, max_steps=1, adv_weight=0, lpips_weight=0)) == 1
        assert re.search(r"in use by a running trainer \(host .*, pid \d+\)", capsys.readouterr().err)
        assert not checkpointing.list_checkpoints(run) and not (run / "metrics.jsonl").exists()
    finally:
        first.release()
    # the holder is gone (as after a crash): the folder is free again
    assert train.main(train_argv(run, max_steps=1, adv_weight=0, lpips_weight=0)) == 0


def test_stale_temp_files_of_a_killed_save_are_removed(train_argv, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=2, stop_at_step=1, adv_weight=0, lpips_weight=0)) == 0
    stale = run / ".ckpt-00000002.pth.k3x_9q2a.tmp"
    stale.write_bytes(b"")
    mine = run / "notes.tmp"  # not the project's pattern: left alone
    mine.write_text("keep me")
    assert train.main(train_argv(run, max_steps=2, resume="auto", adv_weight=0, lpips_weight=0)) == 0
    assert not stale.exists() and mine.exists()
    assert f"removed {stale}" in capsys.readouterr().out


def test_a_full_disk_during_a_save_gives_one_message(train_argv, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=4, save_every=2, stop_at_step=2, adv_weight=0, lpips_weight=0)) == 0

    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from OSError(
            errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpointer, "atomic_torch_save", full_disk)
    capsys.readouterr()
    assert train.main(train_argv(run, max_steps=4, save_every=2, resume="auto", adv_weight=0, lpips_weight=0)) == 1
    message = capsys.readouterr().err
    assert "ckpt-00000004.pth" in message and "the disk is full" in message and "GB free" in message
    assert "ckpt-00000002.pth is intact" in message and "--resume auto" in message
    assert checkpointing.load_checkpoint(run / "ckpt-00000002.pth")["step"] == 2


def test_flipped_bytes_are_caught_by_the_checksum(train_argv, tmp_path):
    """64 bytes flipped inside a tensor (the zip stays intact): the newest checkpoint no longer matches its
    sha256 sidecar, is set aside (not deleted), and --resume auto continues from the previous one."""
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=6, save_every=2, stop_at_step=4, adv_weight=0, lpips_weight=0)) == 0
    newest = checkpointing.list_checkpoints(run)[0]
    assert newest.name == "ckpt-00000004.pth" and checkpointer.checksum_path(newest).is_file()
    data = bytearray(newest.read_bytes())
    at = len(data) // 2
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    newest.write_bytes(bytes(data))
    checkpointing.load_checkpoint(newest)  # torch itself does not notice
    with pytest.warns(UserWarning, match="do not match ckpt-00000004.pth.sha256"):
        assert checkpointing.find_resume_checkpoint(run)["step"] == 2
    assert (run / "ckpt-00000004.pth.unusable").exists()


def test_a_run_folder_without_usable_checkpoints_stops_instead_of_restarting(train_argv, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=4, save_every=2, stop_at_step=4, adv_weight=0, lpips_weight=0)) == 0
    with open(run / "ckpt-00000004.pth", "r+b") as f:
        f.truncate(1000)
    (run / "ckpt-00000002.pth").write_text("junk")
    with pytest.warns(UserWarning, match="setting aside"):
        assert train.main(train_argv(run, max_steps=6, save_every=2, resume="auto", adv_weight=0, lpips_weight=0)) == 1
    assert re.search(r"none of its checkpoints is usable.*--resume restart", capsys.readouterr().err)
    # nothing deleted, and a second try says the same instead of starting from 0
    assert sorted(p.name for p in run.glob("ckpt-*.unusable")) == ["ckpt-00000002.pth.unusable", "ckpt-00000004.pth.unusable"]
    assert train.main(train_argv(run, max_steps=6, resume="auto", adv_weight=0, lpips_weight=0)) == 1
    assert "none of its checkpoints is usable" in capsys.readouterr().err
    assert train.main(train_argv(run, max_steps=2, resume="restart", adv_weight=0, lpips_weight=0)) == 0
    assert train.main(train_argv(tmp_path / "other", max_steps=2, resume=str(run))) == 1
    assert "is a folder: use --resume auto" in capsys.readouterr().err


def test_signals_to_the_process_group_stop_at_a_step_boundary_and_resume_exactly(train_argv, tmp_path,
                                                                                    deterministic):
    """SIGTERM to the whole process group (what Slurm and systemd send) and Ctrl-C (SIGINT to the foreground
    group), each landing during training with a data worker running: the trainer finishes the step, saves
    with that step's data position, exits 128 + the signal; --resume auto then ends bit-equal to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    common = dict(max_steps=6, num_workers=1, deterministic="true", adv_weight=0, lpips_weight=0, save_every=100)
    straight = tmp_path / "straight"
    assert train.main(train_argv(straight, **common)) == 0
    want = checkpointing.load_checkpoint(checkpointing.list_checkpoints(straight)[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        run = tmp_path / sig.name
        proc = subprocess.Popen([sys.executable, os.path.join(root, "train.py"), *train_argv(run, **common)],
                                cwd=root, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.time() + 300
        while time.time() < deadline:  # signal once a few steps are done (mid-step, most likely)
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
            if len(lines) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, out[-2000:]  # 143 for SIGTERM, 130 for Ctrl-C
        assert "DataLoader worker" not in out, out[-2000:]
        stopped_at = checkpointing.load_checkpoint(checkpointing.list_checkpoints(run)[0])["step"]
        assert 2 <= stopped_at < 6, out[-2000:]
        assert train.main(train_argv(run, resume="auto", **common)) == 0
        got = checkpointing.load_checkpoint(checkpointing.list_checkpoints(run)[0])
        for part in ("model", "heads"):
            for k in want[part]:
                torch.testing.assert_close(got[part][k], want[part][k], rtol=0, atol=0, msg=f"{sig.name} {part}.{k}")


def test_a_second_set_aside_of_the_same_name_keeps_the_first(tmp_path):
    """Two damaged checkpoints of one step (a run that failed twice at the same place): both are kept, each with
    its own checksum file, and the message names where each went."""
    names = []
    for content in (b"first damaged file", b"second damaged file"):
        path = checkpointer.checkpoint_path(tmp_path, 24)
        path.write_bytes(content)
        checkpointer.checksum_path(path).write_text(f"{'0' * 64}  {path.name}\n")
        with pytest.warns(UserWarning, match="setting aside"):
            assert checkpointing.find_resume_checkpoint(tmp_path) is None
        names.append(sorted(p.name for p in tmp_path.iterdir()))
    assert names[-1] == ["ckpt-00000024.pth.unusable", "ckpt-00000024.pth.unusable.2",
                         "ckpt-00000024.pth.unusable.2.sha256", "ckpt-00000024.pth.unusable.sha256"]
    assert (tmp_path / "ckpt-00000024.pth.unusable").read_bytes() == b"first damaged file"
    assert (tmp_path / "ckpt-00000024.pth.unusable.2").read_bytes() == b"second damaged file"
    assert [p.name for p in checkpointer.set_aside_checkpoints(tmp_path)] == names[-1][:2]
