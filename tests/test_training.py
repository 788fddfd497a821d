"""The trainer end to end on CPU with tiny networks: exact resume, crash-safe checkpoints, bad-sample
policies, stage 2 continuing stage 1, and the Args plumbing."""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import train
from meditok.data import MedicalImageError
from utilities import checkpointing
from utilities.args import Args, parse_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_networks(tmp_path_factory):
    """Tiny random BiomedCLIP and DINO, written to disk by the project's own script and loaded back."""
    from local_openclip.tiny import make_tiny_biomedclip
    from utilities.discriminator import make_tiny_dino
    out = tmp_path_factory.mktemp("tiny")
    return {"biomedclip": str(make_tiny_biomedclip(out / "biomedclip")), "dino": str(make_tiny_dino(out / "dinov2"))}


@pytest.fixture
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)


def base_flags(tiny_networks, run_dir, **overrides):
    flags = {
        "stage": 1, "preset": "tiny", "img_size": 32, "batch_size": 4, "num_workers": 0, "device": "cpu",
        "train_csv": str(ROOT / "datasets/meta/examples_train.csv"), "train_root": str(ROOT / "datasets/examples"),
        "biomedclip": tiny_networks["biomedclip"], "dino": tiny_networks["dino"], "lpips_vgg": "random",
        "output_dir": str(run_dir), "log_every": 1, "vis_every": 0, "save_every": 100, "warmup_epochs": 0.2,
        "disc_start_epochs": 0.2, "disc_warmup_epochs": 0.2, "seed": 3,
    }
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    return argv


def test_resume_is_exact(tiny_networks, tmp_path, deterministic):
    """6 steps straight == 3 steps, stop, --resume auto, 3 more (crossing an epoch boundary: 5 steps/epoch),
    with every loss on: L1/L2/LPIPS/VQ/contrastive/adversarial+BCR."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(max_steps=6, deterministic="true")
    assert train.main(base_flags(tiny_networks, straight, **common)) == 0
    assert train.main(base_flags(tiny_networks, resumed, stop_at_step=3, **common)) == 0
    assert [p.name for p in checkpointing.list_checkpoints(resumed)] == ["ckpt-00000003.pth"]
    assert train.main(base_flags(tiny_networks, resumed, resume="auto", **common)) == 0

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


def test_data_workers_do_not_change_the_run(tiny_networks, tmp_path, deterministic):
    """Loading in the main process (num_workers=0) or in a persistent worker gives the same run, across an
    epoch boundary (5 steps/epoch): samples are seeded by (epoch, index) and loading leaves the training
    process's RNG alone. --save_every 0 saves only at the end."""
    runs = {}
    for workers in (0, 1):
        run = tmp_path / f"w{workers}"
        assert train.main(base_flags(tiny_networks, run, max_steps=6, num_workers=workers, save_every=0,
                                     deterministic="true")) == 0
        assert [p.name for p in checkpointing.list_checkpoints(run)] == ["ckpt-00000006.pth"]
        runs[workers] = checkpointing.load_checkpoint(checkpointing.list_checkpoints(run)[0])
    for part in ("model", "heads", "disc"):
        for k in runs[0][part]:
            torch.testing.assert_close(runs[0][part][k], runs[1][part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_per_sample_seeding_leaves_the_global_rng_alone():
    from torch.utils.data import DataLoader

    from utilities.training_data import PerSampleSeeded, build_loader, set_loader_position

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


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_networks, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train.main(base_flags(tiny_networks, run, max_steps=1, use_disc="false", use_lpips="false")) == 0
    good = checkpointing.list_checkpoints(run)
    assert [p.name for p in good] == ["ckpt-00000001.pth"]

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # write half a file, then die like a killed process
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(checkpointing.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.atomic_torch_save({"x": torch.zeros(1000)}, checkpointing.checkpoint_path(run, 2))
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    assert [p.name for p in checkpointing.list_checkpoints(run)] == ["ckpt-00000001.pth"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert checkpointing.load_checkpoint(good[0])["step"] == 1

    # a checkpoint truncated by other means (disk full, copy) is skipped by --resume auto
    shutil.copy(good[0], run / "ckpt-00000002.pth")
    with open(run / "ckpt-00000002.pth", "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
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


def test_bad_image_fails_fast_naming_the_file(tiny_networks, tmp_path):
    path, root = write_csv_with_a_bad_image(tmp_path)
    flags = base_flags(tiny_networks, tmp_path / "run", train_csv=path, train_root=root, batch_size=6, max_steps=1,
                       use_disc="false", use_lpips="false", use_contrast="false")
    with pytest.raises(MedicalImageError, match=r"broken\.png"):
        train.main(flags)


def test_bad_image_skipped_counted_and_listed(tiny_networks, tmp_path):
    path, root = write_csv_with_a_bad_image(tmp_path)
    run = tmp_path / "run"
    flags = base_flags(tiny_networks, run, train_csv=path, train_root=root, batch_size=6, max_steps=1,
                       on_bad_sample="skip", use_disc="false", use_lpips="false", use_contrast="false")
    assert train.main(flags) == 0
    listed = (run / "bad_samples.csv").read_text()
    assert "broken.png" in listed
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_samples"] == 1


def test_stage2_continues_from_stage1_with_a_fresh_text_head(tiny_networks, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert train.main(base_flags(tiny_networks, s1, max_steps=2)) == 0
    stage1 = checkpointing.load_checkpoint(checkpointing.list_checkpoints(s1)[0])
    assert train.main(base_flags(tiny_networks, s2, stage=2, init_from=s1, max_steps=1)) == 0
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


def test_training_streams_webdataset_shards(tiny_networks, tmp_path):
    from meditok.data import write_shards
    write_shards(ROOT / "datasets/meta/examples_train.csv", tmp_path / "shards", root=ROOT / "datasets/examples",
                 shard_size=8)
    run = tmp_path / "run"
    flags = base_flags(tiny_networks, run, train_shards=tmp_path / "shards", max_steps=2, use_disc="false",
                       use_lpips="false")
    assert train.main(flags) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss/total"]) for r in records)


def test_two_process_torchrun_on_cpu(tiny_networks, tmp_path):
    """DDP over gloo, as `NPROC=2 bash scripts/train_stage1.sh` launches it, every loss on."""
    import subprocess
    import sys
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train.py"), *base_flags(tiny_networks, run, max_steps=2, batch_size=2)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and math.isfinite(record["loss/total"]) and record["loss/contrast"] > 0
    assert (run / "tokenizer" / "model.safetensors").exists()


def test_wandb_offline_and_ema_weights(tiny_networks, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    flags = base_flags(tiny_networks, run, max_steps=2, use_disc="false", use_lpips="false", report_wandb="true",
                       ema_decay=0.9)
    assert train.main(flags) == 0
    assert list((run / "wandb").glob("offline-run-*")), "wandb should write an offline run in the run folder"
    import meditok
    ema = meditok.load_meditok(run / "tokenizer_ema")
    final = meditok.load_meditok(run / "tokenizer")
    differs = any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), final.state_dict().values()))
    assert differs, "EMA weights should lag behind the trained weights"


def test_bf16_autocast_step_on_cpu(tiny_networks, tmp_path):
    """bf16 autocast (the GPU default) also runs on CPU; autocast op lists differ between devices, so the
    losses must not rely on a device's casting rules (a bf16 target feature once broke the CPU path)."""
    run = tmp_path / "run"
    assert train.main(base_flags(tiny_networks, run, max_steps=1, precision="bf16")) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["loss/total"]) and record["loss/contrast"] > 0


def test_args_precedence_and_errors(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"stage": 2, "batch_size": 7, "betas": [0.8, 0.9]}))
    args = parse_args(["--config", str(cfg), "--batch_size", "5", "--use_disc", "false"])
    assert (args.stage, args.batch_size, args.betas, args.use_disc) == (2, 5, (0.8, 0.9), False)
    assert args.contrast == 1.0 and Args(stage=1).contrast == 0.1  # SPEC: 0.1 in stage 1, 1.0 in stage 2
    named = parse_args(["--config", "stage1_tiny_cpu"])
    assert named.preset == "tiny" and named.max_steps > 0
    cfg.write_text(json.dumps({"bacth_size": 3}))
    with pytest.raises(ValueError, match="unknown argument.*bacth_size"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(FileNotFoundError, match="available"):
        parse_args(["--config", "no_such_config"])
    with pytest.raises(ValueError, match="--stage must be 1 or 2"):
        Args(stage=3)
    with pytest.raises(ValueError, match="--log_every must be ≥ 1"):
        Args(log_every=0)
    with pytest.raises(ValueError, match="--vis_every and --save_every must be ≥ 0"):
        Args(save_every=-1)
    with pytest.raises(ValueError, match="--grad_ckpt_parts must be all, vit or decoder_conv"):
        parse_args(["--grad_ckpt", "true", "--grad_ckpt_parts", "encoder"])
    with pytest.raises(SystemExit):
        parse_args(["--use_disc", "maybe"])
