"""A run ends its process: data-loader workers (which ignore SIGTERM so that a scheduler's signal reaches only
the trainer) are shut down before ``main`` returns, after success and after each error stop; otherwise the
interpreter's exit handler waits for them forever (issue: the quick start's stage 2 hung after its last line)."""
import gc
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import train
from training import checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(adv_weight=0, lpips_weight=0, num_workers=2, log_every=1, save_every=100)


def bad_csv(tmp_path):
    """The examples' CSV with one unreadable image (an empty .png) in its first row."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "broken.png").write_bytes(b"")
    lines = open(os.path.join(ROOT, "datasets/meta/examples_train.csv")).read().splitlines()
    header, rows = lines[0], lines[1:]
    for row in rows:
        name = row.split(",")[0]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, "datasets/examples", name), root / name)
    (tmp_path / "bad.csv").write_text("\n".join([header, "broken.png,an empty file,ct,test"] + rows) + "\n")
    return str(tmp_path / "bad.csv"), str(root)


def run_in_process(argv):
    """train.main with the garbage collector off (so nothing but main itself can end the workers); returns
    (exit status or the exception raised, the data-loader worker processes still alive afterwards)."""
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        try:
            result = train.main(argv)
        except BaseException as error:  # noqa: BLE001 - the test inspects what main let through
            result = error
        alive = [p for p in multiprocessing.active_children() if p not in before]
    finally:
        gc.enable()
    return result, alive


def test_workers_are_gone_when_main_returns_after_success(train_argv, tmp_path):
    result, alive = run_in_process(train_argv(tmp_path / "run", max_steps=2, **QUIET))
    assert result == 0 and not alive, alive


def test_workers_are_gone_after_a_bad_sample_stop(train_argv, tmp_path, capsys):
    csv, root = bad_csv(tmp_path)
    result, alive = run_in_process(train_argv(tmp_path / "run", max_steps=4, train_csv=csv, train_root=root,
                                              on_bad_sample="raise", batch_size=21, **QUIET))
    assert result == 1 and not alive, (result, alive)
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err, err[-2000:]


def test_workers_are_gone_after_the_non_finite_stop(train_argv, tmp_path, capsys):
    result, alive = run_in_process(train_argv(tmp_path / "run", max_steps=6, lr=1e9, **QUIET))
    assert result == 1 and not alive, (result, alive)
    err = capsys.readouterr().err
    assert "non-finite" in err and "Traceback" not in err, err[-2000:]


def test_workers_are_gone_after_the_full_disk_stop(train_argv, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path):
        import errno
        raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpointer, "atomic_torch_save", full_disk)
    result, alive = run_in_process(train_argv(tmp_path / "run", max_steps=2, **QUIET))
    assert result == 1 and not alive, (result, alive)
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("case", ["success", "bad_sample", "non_finite"])
def test_the_process_exits_within_a_bound(train_argv, tmp_path, case):
    """The command itself, as a user runs it: it must end (not only print its last line) within the bound."""
    overrides = dict(QUIET, max_steps=2)
    if case == "bad_sample":
        overrides["train_csv"], overrides["train_root"] = bad_csv(tmp_path)
        overrides["batch_size"] = 21
    if case == "non_finite":
        overrides.update(lr=1e9, max_steps=6)
    began = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *train_argv(tmp_path / "run", **overrides)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == (0 if case == "success" else 1), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert time.time() - began < 240
