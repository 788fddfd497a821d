"""Generator training: exact resume, data-parallel equals one process, refusing the wrong checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import meditok
from generation.ar_model import load_generator
from generation.token_cache import csv_source, write_token_cache
from generation.train_ar import TokenBatches, TrainConfig, train, unigram_baselines
from training.checkpoint_files import RunError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Train (8 images × 2 flips) and validation (3 images) caches of a tiny random tokenizer at 32 px (2 × 2 grid)."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    tokenizer = meditok.build_meditok("tiny").eval()
    meditok.save_meditok(tokenizer, folder / "tokenizer")
    paths = {}
    for split, count in (("train", 8), ("val", 3)):
        lines = ["identifier,caption,modality"]
        for i in range(count):
            name = f"{split}{i}.png"
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR).save(folder / name)
            lines.append(f"{name},,{'fundus' if i % 2 else 'xray'}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
        source = csv_source(folder / f"{split}.csv", folder, 32)
        paths[split] = write_token_cache(tokenizer, source, folder / f"cache_{split}", img_size=32, flip=split == "train",
                                         batch_size=8, progress=False, tokenizer_source=str(folder / "tokenizer"))
    return paths


def config(caches, out, **overrides):
    values = dict(train_cache=str(caches["train"]), val_cache=str(caches["val"]), out=str(out), preset="tiny",
                  batch_size=4, max_steps=6, lr=1e-3, warmup_steps=2, ema=0.9, device="cpu", log_every=1,
                  eval_every=3, sample_every=0, sample_per_label=0, save_every=3, keep_checkpoints=3)
    values.update(overrides)
    return TrainConfig(**values)


def weights(path):
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["model"], payload["ema"], payload["optimizer"]["state"]


def test_resume_is_exact(caches, tmp_path):
    straight = train(config(caches, tmp_path / "straight"))
    train(config(caches, tmp_path / "resumed", max_steps=3))
    resumed = train(config(caches, tmp_path / "resumed", resume="auto"))
    assert resumed["steps"] == straight["steps"] == 6
    a, b = weights(tmp_path / "straight" / "generator.pth"), weights(tmp_path / "resumed" / "generator.pth")
    for left, right in zip(a[:2], b[:2]):
        for name in left:
            torch.testing.assert_close(left[name], right[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[2][0]["exp_avg_sq"], b[2][0]["exp_avg_sq"], atol=1e-6, rtol=0)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)
    # The run learned something, and its files are there.
    assert straight["val_loss"] < straight["uniform"]
    for name in ("args.json", "metrics.jsonl", "baselines.json", "loss_curves.png", "config.json", "summary.json"):
        assert (tmp_path / "resumed" / name).is_file(), name
    steps = [__import__("json").loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in l and "val_loss" not in l]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resuming_with_another_head_or_preset_is_refused(caches, tmp_path):
    train(config(caches, tmp_path / "run", max_steps=3, ema=0.0))
    with pytest.raises(RunError, match="'tiny' generator with sequential heads, but this run builds 'tiny' with independent"):
        train(config(caches, tmp_path / "run", head="independent", resume="auto", ema=0.0))
    with pytest.raises(ValueError, match="not 'B'"):
        load_generator(tmp_path / "run" / "generator.pth", preset="B")


def test_batches_split_one_global_batch_over_ranks(caches):
    from generation.token_cache import TokenCache

    cache = TokenCache(caches["train"])
    one = TokenBatches(cache, 4, seed=3)
    halves = [TokenBatches(cache, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 3, 4, 9):   # 4 steps per epoch: crosses epochs
        ids, labels = one.batch(step)
        parts = [h.batch(step) for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), ids) and torch.equal(torch.cat([p[1] for p in parts]), labels)
        assert torch.equal(torch.cat([h.class_dropout_uniform(step) for h in halves]), one.class_dropout_uniform(step))
    epoch0 = np.concatenate([one.global_indices(s) for s in range(4)])
    assert sorted(epoch0.tolist()) == list(range(16))


def test_unigram_baseline_against_a_direct_count(caches):
    from generation.token_cache import TokenCache

    train_cache, val_cache = TokenCache(caches["train"]), TokenCache(caches["val"])
    result = unigram_baselines(train_cache, val_cache)
    train_ids, val_ids = np.asarray(train_cache.ids).astype(int), np.asarray(val_cache.ids).astype(int)
    fitted, own = [], []
    for k in range(8):  # a plain loop over codes: -log of add-one-smoothed training frequencies, averaged on val
        counts = {}
        for code in train_ids[:, k].ravel():
            counts[code] = counts.get(code, 0) + 1
        total = train_ids[:, k].size + 4096
        fitted.append(np.mean([-np.log((counts.get(code, 0) + 1) / total) for code in val_ids[:, k].ravel()]))
        _, val_counts = np.unique(val_ids[:, k], return_counts=True)
        p = val_counts / val_counts.sum()
        own.append(-(p * np.log(p)).sum())
    assert result["unigram_train_fit_on_val"] == pytest.approx(np.mean(fitted), rel=1e-9)
    assert result["unigram_val_entropy"] == pytest.approx(np.mean(own), rel=1e-9)
    assert result["uniform"] == pytest.approx(np.log(4096))


@pytest.mark.timeout(600)
def test_two_gloo_processes_equal_one_process_on_the_whole_batch(caches, tmp_path):
    train(config(caches, tmp_path / "one", max_steps=3, ema=0.0, val_cache=""))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
               "-m", "generation.train_ar", "--train-cache", str(caches["train"]), "--out", str(tmp_path / "two"),
               "--preset", "tiny", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "2",
               "--device", "cpu", "--log-every", "1", "--save-every", "3", "--sample-per-label", "0"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "generator.pth"), weights(tmp_path / "two" / "generator.pth")
    # equal up to float rounding (a mean over 4 rows vs the mean of two 2-row means, amplified by Adam where
    # gradients are tiny: up to ~1e-6 here); a wrong split of the batch would differ by ~1e-3 (the lr)
    for name in one[0]:
        torch.testing.assert_close(two[0][name], one[0][name], atol=1e-5, rtol=0)


def torchrun(caches, out, port, *flags):
    """``generation.train_ar`` in 2 gloo processes (batch 4: 2 rows each), no validation cache."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "generation.train_ar", "--train-cache", str(caches["train"]), "--out", str(out),
               "--preset", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--ema", "0.9",
               "--device", "cpu", "--log-every", "1", "--save-every", "2", "--sample-per-label", "0", *flags]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.timeout(900)
def test_two_gloo_processes_stopped_and_resumed_equal_an_unbroken_two_process_run(caches, tmp_path):
    """Through the shared Checkpointer: each rank's RNG states are in the checkpoint, the resumed ranks read the
    batches an unbroken run reads, and the weights end bit-equal."""
    torchrun(caches, tmp_path / "straight", 29641, "--max-steps", "4")
    torchrun(caches, tmp_path / "resumed", 29642, "--max-steps", "2")
    checkpoint = torch.load(tmp_path / "resumed" / "ckpt-00000002.pth", map_location="cpu", weights_only=True)
    assert len(checkpoint["ranks"]) == 2 and (tmp_path / "resumed" / "ckpt-00000002.pth.sha256").is_file()
    torchrun(caches, tmp_path / "resumed", 29643, "--max-steps", "4", "--resume", "auto")
    a, b = weights(tmp_path / "straight" / "generator.pth"), weights(tmp_path / "resumed" / "generator.pth")
    for left, right in zip(a[:2], b[:2]):
        for name in left:
            assert torch.equal(left[name], right[name]), name
    assert torch.equal(a[2][0]["exp_avg_sq"], b[2][0]["exp_avg_sq"])


def test_a_run_folder_of_the_earlier_layout_resumes_exactly(caches, tmp_path, capsys):
    """A folder as the trainer wrote it before the shared Checkpointer: 7-digit ``ckpt-*.pth`` without a
    ``.sha256`` sidecar, no per-rank states, no healthy.json, no lock file. A fresh run refuses it; --resume
    auto continues it, bit-equal to an unbroken run; --keep-checkpoints prunes both namings together."""
    from generation.train_ar import main
    old = tmp_path / "old"
    assert main(cli(caches, old, max_steps=3, val_cache="")) == 0
    checkpoint = torch.load(old / "ckpt-00000003.pth", map_location="cpu", weights_only=True)
    for key in ("ranks", "args"):
        del checkpoint[key]
    torch.save(checkpoint, old / "ckpt-0000003.pth")
    for name in ("ckpt-00000003.pth", "ckpt-00000003.pth.sha256", "healthy.json", ".lock"):
        (old / name).unlink(missing_ok=True)
    assert sorted(p.name for p in old.glob("ckpt-*")) == ["ckpt-0000003.pth"]
    capsys.readouterr()

    assert main(cli(caches, old, max_steps=6, val_cache="")) == 1  # a fresh run: refused, nothing overwritten
    err = capsys.readouterr().err
    assert "already holds checkpoints of a run (ckpt-0000003.pth)" in err and "--resume auto" in err, err
    assert main(cli(caches, old, max_steps=6, val_cache="", resume="auto")) == 0
    assert "ckpt-0000003.pth: step 3" in capsys.readouterr().out
    assert main(cli(caches, tmp_path / "straight", max_steps=6, val_cache="")) == 0
    a, b = weights(tmp_path / "straight" / "generator.pth"), weights(old / "generator.pth")
    for left, right in zip(a[:2], b[:2]):
        for name in left:
            assert torch.equal(left[name], right[name]), name
    assert torch.equal(a[2][0]["exp_avg_sq"], b[2][0]["exp_avg_sq"])
    assert sorted(p.name for p in old.glob("ckpt-*.pth")) == ["ckpt-00000006.pth", "ckpt-0000003.pth"]
    assert main(cli(caches, old, max_steps=9, val_cache="", resume="auto", keep_checkpoints=1)) == 0
    # the newest and the one healthy.json names (step 6: a finite loss was logged after it) are kept
    assert sorted(p.name for p in old.glob("ckpt-*.pth")) == ["ckpt-00000006.pth", "ckpt-00000009.pth"]


def cli(caches, out, **overrides):
    """The command line of ``config(caches, out, **overrides)``."""
    values = {k: v for k, v in config(caches, out, **overrides).__dict__.items() if k != "model"}
    return [a for k, v in values.items() if v not in ("", None)
            for a in (f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))]


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_process_group_saves_exits_and_resumes_exactly(caches, tmp_path, run_signalled, sig, code):
    """SIGTERM (Slurm, systemd) or Ctrl-C during step 3 of 6: the step finishes, is saved, the process exits
    143 / 130 without writing generator.pth; --resume auto then ends equal to an unbroken run."""
    from generation.train_ar import main
    stopped = tmp_path / "stopped"
    proc = run_signalled("generation.train_ar", "train_step", 3, sig, cli(caches, stopped, save_every=100))
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "stopped (" in proc.stdout and "at step 3/6" in proc.stdout, proc.stdout[-2000:]
    assert not (stopped / "generator.pth").exists() and (stopped / "ckpt-00000003.pth").is_file()
    assert main(cli(caches, stopped, save_every=100, resume="auto")) == 0
    assert main(cli(caches, tmp_path / "straight", save_every=100)) == 0
    a, b = weights(tmp_path / "straight" / "generator.pth"), weights(stopped / "generator.pth")
    for left, right in zip(a[:2], b[:2]):
        for name in left:
            assert torch.equal(left[name], right[name]), name


@pytest.mark.parametrize("flag, value, says", [
    ("--max-steps", "-5", "--max-steps must be a number >= 0, got -5"),
    ("--batch-size", "0", "--batch-size must be a number > 0, got 0"),
    ("--log-every", "0", "--log-every must be a number > 0, got 0"),
    ("--keep-checkpoints", "0", "--keep-checkpoints must be a number > 0, got 0"),
    ("--warmup-steps", "-10", "--warmup-steps must be a number >= 0, got -10"),
    ("--model", '{"codebook_size": 1024}', "'codebook_size' is set by the token cache"),
    ("--model", '{"colour": 1}', "unknown generator setting 'colour'"),
])
def test_bad_values_give_one_line_and_exit_2(caches, tmp_path, capsys, flag, value, says):
    from generation.train_ar import main
    argv = cli(caches, tmp_path / "run") + [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "generator.pth").exists()


def test_a_config_value_of_the_wrong_type_is_refused(caches, tmp_path, capsys):
    from generation.train_ar import main
    config_file = tmp_path / "c.json"
    config_file.write_text('{"lr": "fast"}')
    assert main(["--config", str(config_file), "--train-cache", str(caches["train"]), "--out", str(tmp_path / "run")]) == 2
    assert "--lr must be float, got 'fast'" in capsys.readouterr().err
