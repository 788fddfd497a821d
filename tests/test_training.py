"""The trainer end to end on CPU with tiny networks: exact resume, crash-safe checkpoints, bad-sample
policies, stage 2 continuing stage 1, and the Args plumbing."""
import csv
import json
import re
import math
import shutil
from pathlib import Path

import pytest
import torch

import train
from meditok.data import MedicalImageError
from tokenizer_training import checkpointing
from training import checkpoint_files, checkpointer
from tokenizer_training.args import Args, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_resume_is_exact(train_argv, tmp_path, deterministic):
    """6 steps straight == 3 steps, stop, --resume auto, 3 more (crossing an epoch boundary: 5 steps/epoch),
    with every loss on: L1/L2/LPIPS/VQ/contrastive/adversarial+BCR."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(max_steps=6, deterministic="true")
    assert train.main(train_argv(straight, **common)) == 0
    assert train.main(train_argv(resumed, stop_at_step=3, **common)) == 0
    assert [p.name for p in checkpointing.list_checkpoints(resumed)] == ["ckpt-00000003.pth"]
    assert train.main(train_argv(resumed, resume="auto", **common)) == 0

    a = checkpointing.load_checkpoint(checkpointing.list_checkpoints(straight)[0])
    b = checkpointing.load_checkpoint(checkpointing.list_checkpoints(resumed)[0])
    assert a["step"] == b["step"] == 6
    for part in ("model", "heads", "disc"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
    # the adversarial and contrastive terms really were active
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss/g_adv", 0) != 0 for r in logged) and all(r["loss/contrast"] > 0 for r in logged)
    assert (straight / "tokenizer" / "model.safetensors").exists() and (straight / "loss_curves.png").exists()


def test_data_workers_do_not_change_the_run(train_argv, tmp_path, deterministic):
    """Loading in the main process (num_workers=0) or in a persistent worker gives the same run, across an
    epoch boundary (5 steps/epoch): samples are seeded by (epoch, index) and loading leaves the training
    process's RNG alone. --save_every 0 saves only at the end."""
    runs = {}
    for workers in (0, 1):
        run = tmp_path / f"w{workers}"
        assert train.main(train_argv(run, max_steps=6, num_workers=workers, save_every=0,
                                     deterministic="true")) == 0
        assert [p.name for p in checkpointing.list_checkpoints(run)] == ["ckpt-00000006.pth"]
        runs[workers] = checkpointing.load_checkpoint(checkpointing.list_checkpoints(run)[0])
    for part in ("model", "heads", "disc"):
        for k in runs[0][part]:
            torch.testing.assert_close(runs[0][part][k], runs[1][part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_per_sample_seeding_leaves_the_global_rng_alone():
    from torch.utils.data import DataLoader

    from tokenizer_training.training_data import PerSampleSeeded, build_loader, set_loader_position

    class Noise(torch.utils.data.Dataset):  # an "augmentation" that draws from the global RNGs
        def __len__(self):
            return 6

        def __getitem__(self, i):
            import random
            return {"x": torch.rand(2), "r": random.random()}

    ds = PerSampleSeeded(Noise(), seed=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a, b = ds[(2, 4)], ds[(2, 4)]
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is where it was
    torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)
    assert a["r"] == b["r"] and not torch.equal(ds[(3, 4)]["x"], a["x"])  # (epoch, index) decides the draw
    ds.set_epoch(2)
    assert torch.equal(ds[4]["x"], a["x"])  # a bare index uses set_epoch's epoch

    loader = build_loader(ds, batch_size=2, num_workers=1, seed=5, rank=0, world_size=1, device_type="cpu")
    assert isinstance(loader, DataLoader) and loader.persistent_workers
    epochs = []
    for epoch in (0, 1, 0):
        set_loader_position(loader, epoch, 0)
        epochs.append(torch.cat([batch["x"] for batch in loader]))
    assert torch.equal(epochs[0], epochs[2]) and not torch.equal(epochs[0], epochs[1])


def test_a_crash_while_saving_keeps_the_previous_checkpoint(train_argv, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=1, adv_weight=0, lpips_weight=0)) == 0
    good = checkpointing.list_checkpoints(run)
    assert [p.name for p in good] == ["ckpt-00000001.pth"]

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # write part of a file, then die like a killed process
        real_save({"x": torch.zeros(10)}, f, *a, **k)
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(checkpoint_files.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.atomic_torch_save({"x": torch.zeros(1000)}, checkpointer.checkpoint_path(run, 2))
    monkeypatch.setattr(checkpoint_files.torch, "save", real_save)
    assert [p.name for p in checkpointing.list_checkpoints(run)] == ["ckpt-00000001.pth"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert checkpointing.load_checkpoint(good[0])["step"] == 1

    # a checkpoint truncated by other means (disk full, copy) is skipped by --resume auto
    shutil.copy(good[0], run / "ckpt-00000002.pth")
    with open(run / "ckpt-00000002.pth", "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match=r"setting aside checkpoint .*ckpt-00000002\.pth.*unreadable"):
        found = checkpointing.find_resume_checkpoint(run)
    assert found["step"] == 1


def write_csv_with_a_bad_image(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    with open(ROOT / "datasets/meta/examples_train.csv", newline="") as f:
        for row in list(csv.DictReader(f))[:5]:
            rows.append(row)
    (root / "broken.png").write_bytes(b"this is not a PNG")
    rows.insert(2, {"identifier": "broken.png", "caption": "a broken file", "modality": "xray"})
    for row in rows:
        if row["identifier"] != "broken.png":
            dest = root / row["identifier"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "datasets/examples" / row["identifier"], dest)
    path = tmp_path / "with_bad.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["identifier", "caption", "modality"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path, root


def test_bad_image_fails_fast_naming_the_file(train_argv, tmp_path, capsys):
    path, root = write_csv_with_a_bad_image(tmp_path)
    flags = train_argv(tmp_path / "run", train_csv=path, train_root=root, batch_size=6, max_steps=1,
                       adv_weight=0, lpips_weight=0, contrast_weight=0)
    assert train.main(flags) == 1  # one message, exit status 1
    err = capsys.readouterr().err
    assert re.search(r"\[train\] error: .*broken\.png", err) and "Traceback" not in err, err


def test_bad_image_skipped_counted_and_listed(train_argv, tmp_path):
    path, root = write_csv_with_a_bad_image(tmp_path)
    run = tmp_path / "run"
    flags = train_argv(run, train_csv=path, train_root=root, batch_size=6, max_steps=1,
                       on_bad_sample="skip", adv_weight=0, lpips_weight=0, contrast_weight=0)
    assert train.main(flags) == 0
    listed = (run / "bad_samples.csv").read_text()
    assert "broken.png" in listed
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_samples"] == 1


def test_stage2_continues_from_stage1_with_a_fresh_text_head(train_argv, tiny_networks, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert train.main(train_argv(s1, max_steps=2)) == 0
    stage1 = checkpointing.load_checkpoint(checkpointing.list_checkpoints(s1)[0])
    assert train.main(train_argv(s2, stage=2, init_from=s1, max_steps=1)) == 0
    stage2 = checkpointing.load_checkpoint(checkpointing.list_checkpoints(s2)[0])
    assert json.loads((s2 / "args.json").read_text())["stage"] == 2
    # stage 2's head is a fresh f_text on the text tower's width; stage 1's f_vision is on the trunk's
    import local_openclip
    text_dim = local_openclip.load_text_teacher(tiny_networks["biomedclip"]).output_dim
    vision_dim = local_openclip.load_vision_teacher(tiny_networks["biomedclip"]).output_dim
    assert stage2["heads"]["proj.weight"].shape == (768, text_dim)
    assert stage1["heads"]["proj.weight"].shape == (768, vision_dim)
    # one step moved the stage-1 weights, it did not start from scratch: most tensors still close
    moved = [k for k in stage1["model"] if not torch.allclose(stage1["model"][k], stage2["model"][k], atol=1e-2)]
    assert len(moved) < len(stage1["model"]) / 2
    assert stage2["disc"] is not None


def test_training_streams_webdataset_shards(train_argv, tmp_path):
    from meditok.data import write_shards
    write_shards(ROOT / "datasets/meta/examples_train.csv", tmp_path / "shards", root=ROOT / "datasets/examples",
                 shard_size=8)
    run = tmp_path / "run"
    flags = train_argv(run, train_shards=tmp_path / "shards", max_steps=2, adv_weight=0,
                       lpips_weight=0)
    assert train.main(flags) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss/total"]) for r in records)


def test_wandb_offline_and_ema_weights(train_argv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    flags = train_argv(run, max_steps=2, adv_weight=0, lpips_weight=0, report_wandb="true",
                       ema_decay=0.9)
    assert train.main(flags) == 0
    assert list((run / "wandb").glob("offline-run-*")), "wandb should write an offline run in the run folder"
    import meditok
    ema = meditok.load_meditok(run / "tokenizer_ema")
    final = meditok.load_meditok(run / "tokenizer")
    differs = any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), final.state_dict().values()))
    assert differs, "EMA weights should lag behind the trained weights"


def test_bf16_autocast_step_on_cpu(train_argv, tmp_path):
    """bf16 autocast (the GPU default) also runs on CPU; autocast op lists differ between devices, so the
    losses must not rely on a device's casting rules (a bf16 target feature once broke the CPU path)."""
    run = tmp_path / "run"
    assert train.main(train_argv(run, max_steps=1, precision="bf16")) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["loss/total"]) and record["loss/contrast"] > 0


def test_args_precedence_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"stage": 2, "batch_size": 7, "betas": [0.8, 0.9]}))
    args = parse_args(["--config", str(cfg), "--batch-size", "5", "--adv-weight", "0", "--deterministic"])
    assert (args.stage, args.batch_size, args.betas, args.adv_weight, args.deterministic) == (2, 5, (0.8, 0.9), 0, True)
    assert parse_args(["--batch_size", "3", "--deterministic", "false"]).batch_size == 3  # the snake_case alias
    assert args.contrast == 1.0 and Args(stage=1).contrast == 0.1  # the paper: 0.1 in stage 1, 1.0 in stage 2
    named = parse_args(["--config", "stage1_tiny_cpu"])
    assert named.preset == "tiny" and named.max_steps > 0

    def usage_error(argv):
        """A bad flag or config ends in one usage line naming it (exit 2), not a traceback."""
        with pytest.raises(SystemExit) as caught:
            parse_args(argv)
        assert caught.value.code == 2
        return capsys.readouterr().err

    cfg.write_text(json.dumps({"bacth_size": 3}))
    assert "unknown argument(s) ['bacth_size']" in usage_error(["--config", str(cfg)])
    assert "available" in usage_error(["--config", "no_such_config"])
    for bad, key in (('{"batch_size": "8"}', "'batch_size' must be a whole number"),
                     ('{"batch_size": 8.5}', "'batch_size' must be a whole number"),
                     ('{"batch_size": 8', "is not valid JSON")):
        cfg.write_text(bad)
        err = usage_error(["--config", str(cfg)])
        assert key in err and str(cfg) in err, err
    cfg.write_text('{"batch_size": 8.0, "lr": 1}')  # integral numbers are fine either way
    assert parse_args(["--config", str(cfg)]).batch_size == 8
    assert "--stage must be 1, 2 or 3" in usage_error(["--stage", "4"])
    assert "--preset must be one of" in usage_error(["--preset", "huge"])
    for steps in ("-5", "0 --epochs 0"):  # a run that would train nothing and still write a "trained" tokenizer
        assert "nothing to train" in usage_error(["--max-steps", *steps.split()])
    assert "--log-every must be ≥ 1" in usage_error(["--log-every", "0"])
    assert "--vis-every and --save-every must be ≥ 0" in usage_error(["--save-every", "-1"])
    assert "--on-bad-sample must be 'raise' or 'skip'" in usage_error(["--on-bad-sample", "foo"])
    assert "--precision must be auto, fp32 or bf16" in usage_error(["--precision", "fp16"])
    assert "--grad-ckpt-parts must be all, vit, decoder_conv" in usage_error(
        ["--grad-ckpt", "true", "--grad-ckpt-parts", "encoder"])
    assert "expected true/false" in usage_error(["--deterministic", "maybe"])


def test_config_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--config", "stage1_tiny_cpu"])
    assert Path(args.train_csv).is_file() and Path(args.train_root).is_dir()
    assert args.biomedclip == str(ROOT / "external/tiny/biomedclip") or not (ROOT / "external/tiny").exists()


def test_deprecated_switches_still_read_as_weight_zero(tmp_path):
    """Saved args.json files and old commands with use_disc/use_lpips/use_contrast keep working."""
    cfg = tmp_path / "old_args.json"
    cfg.write_text(json.dumps({"use_disc": False, "use_lpips": True, "use_contrast": False}))
    with pytest.warns(FutureWarning, match="use_disc.*adv_weight"):
        args = parse_args(["--config", str(cfg)])
    assert (args.adv_weight, args.lpips_weight, args.contrast) == (0, 1.0, 0)
    with pytest.warns(FutureWarning, match="use_lpips"):
        assert parse_args(["--use_lpips", "false"]).lpips_weight == 0


def test_loss_terms_are_declared_and_weight_zero_turns_them_off(train_argv, tmp_path):
    """The trainer evaluates what is declared: a term of weight 0 is absent (no network built, not logged),
    and a new image-space term declared with its kind trains the tokenizer through the single backward."""
    from tokenizer_training.losses import LossKind, LossTerm
    from tokenizer_training.trainer import Trainer
    args = parse_args(train_argv(tmp_path / "r", lpips_weight=0, adv_weight=0, contrast_weight=0,
                                 l1_weight=0))
    trainer = Trainer(args, torch.device("cpu"))
    assert [t.name for t in trainer.loss_terms] == ["rec_l2", "vq"]
    assert trainer.lpips is None and trainer.disc is None and trainer.alignments == [] and not trainer.heads
    from tokenizer_training.schedule import Schedule
    trainer.schedule = Schedule.from_args(args, steps_per_epoch=5)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    logs = trainer.backward({"image": images}, 1.0, False, 0.0)
    assert set(logs) == {"loss/rec_l2", "loss/vq", "codebook_usage", "loss/total"}

    # declaring one more image-space term is all it takes for it to reach the decoder's gradient
    trainer.opt.zero_grad(set_to_none=True)
    trainer.backward({"image": images}, 1.0, False, 0.0)
    base = trainer.tokenizer.decoder.last_layer.grad.clone()
    trainer.opt.zero_grad(set_to_none=True)
    trainer.loss_terms.append(LossTerm("mean_shift", LossKind.IMAGE, 3.0, lambda rec, x: (rec.mean() - x.mean()) ** 2))
    logs = trainer.backward({"image": images}, 1.0, False, 0.0)
    assert "loss/mean_shift" in logs
    assert not torch.allclose(trainer.tokenizer.decoder.last_layer.grad, base)


def write_small_shards(tmp_path, shard_size=4):
    from meditok.data import write_shards
    return write_shards(ROOT / "datasets/meta/examples_train.csv", tmp_path / "shards",
                        root=ROOT / "datasets/examples", shard_size=shard_size)


def test_shard_runs_draw_reconstruction_grids(train_argv, tmp_path):
    """Shards with --vis-every > 0: the grid comes from the stream's first batch (it crashed before)."""
    write_small_shards(tmp_path)
    run = tmp_path / "run"
    assert train.main(train_argv(run, train_shards=tmp_path / "shards", max_steps=2, vis_every=1,
                                 adv_weight=0, lpips_weight=0)) == 0
    assert sorted(p.name for p in (run / "vis").iterdir()) == ["step00000001.png", "step00000002.png"]


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_runs_resume_exactly_and_count_epochs(train_argv, tmp_path, deterministic, workers):
    """7 steps straight == 3 + --resume auto + 4 on shards (shuffled shard order and buffer, augmentations,
    crossing an epoch), with 0 and 2 data workers; the epoch advances on each pass over the 21 samples
    (5 steps of 4)."""
    index = write_small_shards(tmp_path)
    assert index["num_samples"] == 21
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(train_shards=tmp_path / "shards", max_steps=7, deterministic="true", num_workers=workers,
                  log_every=1, lpips_weight=0)
    assert train.main(train_argv(straight, **common)) == 0
    assert train.main(train_argv(resumed, stop_at_step=3, **common)) == 0
    assert train.main(train_argv(resumed, resume="auto", **common)) == 0
    a = checkpointing.load_checkpoint(checkpointing.list_checkpoints(straight)[0])
    b = checkpointing.load_checkpoint(checkpointing.list_checkpoints(resumed)[0])
    assert a["step"] == b["step"] == 7
    for part in ("model", "heads", "disc"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
    epochs = [json.loads(line)["epoch"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0] == 0 and epochs[-1] >= 1 and epochs == sorted(epochs)


def run_torchrun(flags, port):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train.py"), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_ranks_draw_their_own_streams_and_resume_them(train_argv, tmp_path):
    """Each rank augments from its own RNG stream (seeded after the identical network initialisation), every
    rank's state is saved, and a resumed 2-process run equals the straight one (before: rank 0's state was
    restored on every rank, and in a run from scratch all ranks drew the same numbers)."""
    common = dict(max_steps=3, batch_size=2, deterministic="true", disc_start_epochs=0, disc_warmup_epochs=0,
                  lpips_weight=0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_torchrun(train_argv(straight, **common), 29521)
    assert "2 process(es)" in proc.stdout  # DDP over gloo, as `NPROC=2 bash scripts/train_stage1.sh` launches it
    record = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and math.isfinite(record["loss/total"]) and record["loss/contrast"] > 0
    assert (straight / "tokenizer" / "model.safetensors").exists()
    run_torchrun(train_argv(resumed, stop_at_step=1, **common), 29522)
    ckpt = checkpointing.load_checkpoint(checkpointing.list_checkpoints(resumed)[0])
    assert len(ckpt["ranks"]) == 2
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])
    run_torchrun(train_argv(resumed, resume="auto", **common), 29523)
    a = checkpointing.load_checkpoint(checkpointing.list_checkpoints(straight)[0])
    b = checkpointing.load_checkpoint(checkpointing.list_checkpoints(resumed)[0])
    assert a["step"] == b["step"] == 3
    for part in ("model", "disc"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
