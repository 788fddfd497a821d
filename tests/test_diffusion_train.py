"""Diffusion trainer on a real (tiny) token cache: exact resume (one process, two gloo processes, and from a run
folder of the old layout), samples written, clear errors; caption truncation is counted."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generation import tokenize_dataset
from generation.diffusion import train as diffusion_train
from generation.diffusion.loading import load_for_inference
from generation.text import CaptionTruncationWarning, TextCodec, load_text_tokenizer, train_caption_tokenizer
from training.checkpoint_files import atomic_torch_save
from training.checkpointer import list_checkpoints

CSV, ROOT = "datasets/meta/examples_train.csv", "datasets/examples"
REPO = Path(__file__).resolve().parents[1]


def newest(run_dir):
    """The path of the newest checkpoint in a run folder (ckpt-XXXXXXXX.pth)."""
    return list_checkpoints(run_dir)[0]


def load_newest(run_dir):
    return torch.load(newest(run_dir), weights_only=True)


def assert_same_weights(a, b):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 32-px token cache of the bundled examples (random tiny tokenizer, 2×2 grid) + a caption tokenizer."""
    base = tmp_path_factory.mktemp("diffusion")
    cache = base / "cache"
    assert tokenize_dataset.main(["--random-tokenizer", "tiny", "--csv", CSV, "--root", ROOT, "--out", str(cache),
                                  "--img-size", "32", "--num-workers", "0"]) == 0
    import csv
    captions = [row["caption"] for row in csv.DictReader(open(CSV))]
    tokenizer = train_caption_tokenizer(captions, base / "tokenizer", vocab_size=300)
    return base, cache, tokenizer


def run(setup, out, *extra):
    base, cache, tokenizer = setup
    return diffusion_train.main(["--cache", str(cache), "--text-tokenizer", str(tokenizer), "--preset", "tiny",
                                 "--out", str(out), "--batch-size", "4", "--text-len", "64", "--log-every", "1",
                                 "--save-every", "2", "--warmup-steps", "2", "--num-samples", "0", *extra])


def test_exact_resume(setup, tmp_path):
    assert run(setup, tmp_path / "straight", "--steps", "4") == 0
    assert run(setup, tmp_path / "split", "--steps", "2") == 0
    assert run(setup, tmp_path / "split", "--steps", "4", "--resume", "auto") == 0
    a, b = load_newest(tmp_path / "straight"), load_newest(tmp_path / "split")
    assert a["step"] == 4
    assert_same_weights(a, b)
    lines = [json.loads(l) for l in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(l) for l in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert [l["loss"] for l in lines] == [l["loss"] for l in straight]
    assert (tmp_path / "straight/ckpt-00000002.pth").is_file() and (tmp_path / "straight/ckpt-00000004.pth").is_file()
    assert not (tmp_path / "straight/checkpoints").exists()  # one naming scheme: ckpt-*.pth in the run folder


def test_samples_written_and_decoded(setup, tmp_path):
    assert run(setup, tmp_path / "run", "--steps", "1", "--num-samples", "2", "--sample-steps", "2") == 0
    folder = tmp_path / "run/samples/step_0000001"
    reports = json.loads((folder / "reports.json").read_text())
    assert len(reports["image_to_text"]) == 2 and len(reports["joint"]) == 2
    ids = torch.load(folder / "ids.pt")
    assert ids["text_to_image"].shape == (2, 8, 4) and ids["text_to_image"].max() < 4096
    for name in ("text_to_image", "joint", "real"):  # the cache's random tokenizer decodes them
        assert (folder / f"{name}.png").stat().st_size > 0


def test_bad_inputs_give_clear_errors(setup, tmp_path, capsys):
    assert run(setup, tmp_path / "a", "--steps", "2") == 0
    # resuming with another preset/architecture: the checkpoint is refused (a RunError, exit 1)
    assert run(setup, tmp_path / "a", "--steps", "3", "--resume", "auto", "--text-len", "48") == 1
    err = capsys.readouterr().err
    assert "ckpt-00000002.pth: the checkpoint was trained with a different model" in err, err
    assert "text_len: checkpoint 64 vs requested 48" in err
    # a backbone with a from-scratch preset, and an unknown backbone folder
    assert run(setup, tmp_path / "b", "--steps", "1", "--backbone", str(tmp_path / "nope")) == 2
    assert "needs --preset hf" in capsys.readouterr().err
    assert run(setup, tmp_path / "b", "--steps", "1", "--preset", "hf", "--backbone", str(tmp_path / "nope")) == 2
    assert "is not a folder with a transformers config.json" in capsys.readouterr().err
    # a cache folder that is not a cache
    base, cache, tokenizer = setup
    assert diffusion_train.main(["--cache", str(tmp_path), "--text-tokenizer", str(tokenizer), "--steps", "1",
                                 "--out", str(tmp_path / "c")]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err


def test_resume_refuses_another_tokenizers_cache(setup, tmp_path, capsys):
    assert run(setup, tmp_path / "run", "--steps", "1") == 0
    payload = load_newest(tmp_path / "run")
    payload["tokenizer_fingerprint"] = "0" * 64  # as if trained on another tokenizer's ids
    atomic_torch_save(payload, newest(tmp_path / "run"))  # with a matching checksum: a refusal, not a damaged file
    assert run(setup, tmp_path / "run", "--steps", "2", "--resume", "auto") == 1
    assert "ids of another MedITok" in capsys.readouterr().err


def test_caption_truncation_is_counted(setup):
    _, _, tokenizer = setup
    codec = TextCodec(load_text_tokenizer(tokenizer), text_len=6)
    with pytest.warns(CaptionTruncationWarning, match="1 of 2 captions exceeded the text budget of 6 tokens"):
        ids = codec.encode(["ct", "axial contrast enhanced ct of the thorax centred on a vertebra"])
    assert ids.shape == (2, 6) and codec.truncated == 1 and codec.seen == 2
    assert ids[1, -1].item() == codec.eos  # the end token survives truncation
    assert codec.decode(ids[:1]) == ["ct"]


def test_trains_from_a_pretrained_hf_causal_lm(setup, tmp_path):
    """preset hf: a tiny random Llama saved to disk with its tokenizer, cut to 1 of 3 layers, trains and resumes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, cache, tokenizer_dir = setup
    tokenizer = load_text_tokenizer(tokenizer_dir)
    backbone = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)  # the backbone's own tokenizer is the default text tokenizer
    args = ["--cache", str(cache), "--preset", "hf", "--backbone", str(backbone), "--num-layers", "1",
            "--out", str(tmp_path / "run"), "--batch-size", "2", "--text-len", "64", "--num-samples", "0"]
    assert diffusion_train.main(args + ["--steps", "1"]) == 0
    payload = load_newest(tmp_path / "run")
    assert payload["diffusion_config"]["num_layers"] == 1
    assert sum(k.startswith("blocks.") and k.endswith("self_attn.q_proj.weight") for k in payload["model"]) == 1
    assert diffusion_train.main(args + ["--steps", "2", "--resume", "auto"]) == 0
    model, codec, _ = load_for_inference(tmp_path / "run")
    assert model.num_layers == 1 and codec.vocab_size == len(tokenizer)


def test_sample_cli_all_tasks(setup, tmp_path, capsys):
    from generation.diffusion import sample as sample_cli

    base, cache, tokenizer = setup
    assert run(setup, tmp_path / "run", "--steps", "1") == 0
    ckpt = str(tmp_path / "run")  # a run folder: its newest checkpoint
    common = ["--checkpoint", ckpt, "--num", "3", "--batch-size", "2", "--steps", "2", "--out", str(tmp_path / "gen"),
              "--device", "cpu"]
    assert sample_cli.main(common + ["--task", "text_to_image", "--prompt", "axial ct", "--label", "ct",
                                     "--meditok", str(cache / "tokenizer")]) == 0
    assert sample_cli.main(common + ["--task", "image_to_text", "--cache", str(cache)]) == 0
    assert sample_cli.main(common + ["--task", "joint", "--label", "mri", "--cfg-scale", "2"]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "text tokens/s" in printed
    t2i = torch.load(tmp_path / "gen/text_to_image_ids.pt")
    assert t2i.shape == (3, 8, 4) and (tmp_path / "gen/text_to_image.png").is_file()
    reports = json.loads((tmp_path / "gen/image_to_text.json").read_text())
    assert len(reports["reports"]) == 3 and len(reports["references"]) == 3
    assert json.loads((tmp_path / "gen/joint.json").read_text())["labels"] == ["mri"] * 3
    assert sample_cli.main(common + ["--task", "joint", "--label", "xray"]) == 2
    assert "is not one of the model's labels" in capsys.readouterr().err


def argv_for(setup, out, *extra):
    base, cache, tokenizer = setup
    return ["--cache", str(cache), "--text-tokenizer", str(tokenizer), "--preset", "tiny", "--out", str(out),
            "--batch-size", "4", "--text-len", "64", "--log-every", "1", "--save-every", "100", "--warmup-steps", "2",
            "--num-samples", "0", "--steps", "5", *extra]


def test_sigterm_to_the_process_group_saves_exits_143_and_resumes_exactly(setup, tmp_path, run_signalled):
    """SIGTERM during step 3 of 5 (to the whole group, with 2 data workers): the step finishes and is saved, the
    process exits 143 (workers gone, no hang); --resume auto then ends bit-equal to an unbroken run."""
    stopped = tmp_path / "stopped"
    proc = run_signalled("generation.diffusion.train", "diffusion_loss", 3, "SIGTERM",
                         argv_for(setup, stopped, "--num-workers", "2"))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped (SIGTERM) at step 3/5" in proc.stdout, proc.stdout[-2000:]
    assert diffusion_train.main(argv_for(setup, stopped, "--resume", "auto")) == 0
    assert diffusion_train.main(argv_for(setup, tmp_path / "straight")) == 0
    a, b = load_newest(tmp_path / "straight"), load_newest(stopped)
    assert a["step"] == 5
    assert_same_weights(a, b)


@pytest.mark.parametrize("flag, value, says", [
    ("--steps", "-5", "--steps must be a number > 0, got -5"),
    ("--batch-size", "0", "--batch-size must be a number > 0, got 0"),
    ("--log-every", "0", "--log-every must be a number > 0, got 0"),
    ("--warmup-steps", "-10", "--warmup-steps must be a number >= 0, got -10"),
    ("--task-mix", "1,x", "--task-mix must be three weights"),
])
def test_bad_values_give_one_line_and_exit_2(setup, tmp_path, capsys, flag, value, says):
    assert diffusion_train.main(argv_for(setup, tmp_path / "run", flag, value)) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not list_checkpoints(tmp_path / "run")


def test_save_every_0_saves_only_at_the_end(setup, tmp_path):
    assert diffusion_train.main(argv_for(setup, tmp_path / "run", "--save-every", "0", "--steps", "2")) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt-00000002.pth"]


def test_a_resumed_run_logs_each_step_once(setup, tmp_path):
    """A run killed after logging steps its last checkpoint does not hold: on resume those lines are dropped and
    logged again, so metrics.jsonl equals an unbroken run's (they used to appear twice)."""
    run_dir = tmp_path / "run"
    assert diffusion_train.main(argv_for(setup, run_dir, "--steps", "4", "--save-every", "2")) == 0
    def records():  # without the timing, which differs between any two runs
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    straight = records()
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert json.loads((run_dir / "args.json").read_text())["steps"] == 4  # the run folder's one layout
    for path in (run_dir / "ckpt-00000004.pth", run_dir / "ckpt-00000004.pth.sha256"):
        path.unlink()  # as if killed after step 4's log, before its checkpoint
    assert diffusion_train.main(argv_for(setup, run_dir, "--steps", "4", "--save-every", "2", "--resume", "auto")) == 0
    assert records() == straight


def test_grad_clip_0_means_no_clipping(setup, tmp_path):
    """--grad-clip 0 is "off" (as in the other trainers): the same weights as a clip no gradient reaches. It used to
    call clip_grad_norm_(…, 0), which zeroes every gradient, so the model never learned."""
    for name, clip in (("off", "0"), ("huge", "1e9")):
        assert diffusion_train.main(argv_for(setup, tmp_path / name, "--steps", "2", "--grad-clip", clip)) == 0
    a, b = load_newest(tmp_path / "off")["model"], load_newest(tmp_path / "huge")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_between_logged_steps_resumes_the_same_averages(setup, tmp_path, run_signalled):
    """SIGTERM at step 3 with --log-every 2: the loss window of step 3 is saved with the checkpoint, so the
    record of step 4 after --resume auto averages steps 3 and 4 as in an unbroken run."""
    def records(run_dir):  # without the timing, which differs between any two runs
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stopped = tmp_path / "stopped"
    argv = argv_for(setup, stopped, "--log-every", "2")
    assert run_signalled("generation.diffusion.train", "diffusion_loss", 3, "SIGTERM", argv).returncode == 143
    assert diffusion_train.main(argv + ["--resume", "auto"]) == 0
    assert diffusion_train.main(argv_for(setup, tmp_path / "straight", "--log-every", "2")) == 0
    assert [r["step"] for r in records(stopped)] == [2, 4, 5]
    assert records(stopped) == records(tmp_path / "straight")


def test_a_fresh_run_in_a_folder_holding_a_run_is_refused(setup, tmp_path, capsys):
    """No --resume in a folder that holds checkpoints: refused (exit 1, nothing overwritten), as every trainer
    does; --resume restart too while a usable checkpoint would be lost."""
    assert run(setup, tmp_path / "run", "--steps", "1") == 0
    before = newest(tmp_path / "run").read_bytes()
    assert run(setup, tmp_path / "run", "--steps", "1") == 1
    assert "already holds checkpoints of a run (ckpt-00000001.pth)" in capsys.readouterr().err
    assert run(setup, tmp_path / "run", "--steps", "1", "--resume", "restart") == 1
    assert "holds usable checkpoints" in capsys.readouterr().err
    assert newest(tmp_path / "run").read_bytes() == before


OLD_KEYS = ("format", "diffusion_config", "model", "optimizer", "step", "args", "tokenizer_fingerprint", "loss_window")


def write_old_layout(run_dir):
    """Turn a run folder into what the trainer wrote before the shared checkpointer: ``checkpoints/latest.pt`` and
    ``checkpoints/step_XXXXXXX.pt`` (plain torch.save of the old payload: no per-rank states, no checksum)."""
    payload = load_newest(run_dir)
    old = {key: payload[key] for key in OLD_KEYS}
    (run_dir / "checkpoints").mkdir()
    torch.save(old, run_dir / "checkpoints" / "latest.pt")
    torch.save(old, run_dir / "checkpoints" / f"step_{old['step']:07d}.pt")
    for path in list(run_dir.glob("ckpt-*")) + [run_dir / "healthy.json"]:
        path.unlink(missing_ok=True)
    return old["step"]


def test_a_run_folder_of_the_old_layout_resumes_and_loads(setup, tmp_path, capsys):
    """checkpoints/latest.pt of an older run: loaded for inference from the folder, refused to a fresh run,
    continued exactly by --resume auto (and by --resume PATH of an old file), and never pruned."""
    old = tmp_path / "old"
    assert run(setup, old, "--steps", "2") == 0
    assert write_old_layout(old) == 2
    model, _, payload = load_for_inference(old)  # generation.diffusion.sample / evaluation.diffusion --checkpoint RUN
    assert payload["_path"].endswith("checkpoints/latest.pt") and payload["step"] == 2 and payload["ranks"] == []
    assert run(setup, old, "--steps", "4") == 1
    assert "already holds checkpoints of a run (latest.pt)" in capsys.readouterr().err
    assert run(setup, old, "--steps", "4", "--resume", "auto") == 0
    assert "checkpoints/latest.pt: step 2" in capsys.readouterr().out
    assert run(setup, tmp_path / "straight", "--steps", "4") == 0
    assert_same_weights(load_newest(tmp_path / "straight"), load_newest(old))
    assert newest(old).name == "ckpt-00000004.pth" and (old / "checkpoints" / "latest.pt").is_file()
    assert load_for_inference(old)[2]["_path"] == str(newest(old))  # now the newest of the current scheme
    lines = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    # --resume PATH of an old numbered file, into another folder
    assert run(setup, tmp_path / "from_file", "--steps", "4", "--resume", str(old / "checkpoints/step_0000002.pt")) == 0
    assert_same_weights(load_newest(tmp_path / "straight"), load_newest(tmp_path / "from_file"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv):
    """The diffusion trainer in 2 gloo processes (torchrun), as a finished subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "generation.diffusion.train", *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)


@pytest.mark.timeout(900)
def test_two_gloo_processes_stopped_and_resumed_equal_an_unbroken_two_process_run(setup, tmp_path):
    """2 processes stop after step 2 (--stop-at-step), resume with --resume auto to step 4: the weights and the
    logged records equal those of an unbroken 2-process run; each checkpoint holds both ranks' states."""
    def records(run_dir):  # without the timing, which differs between any two runs
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    split = tmp_path / "split"
    done = torchrun(argv_for(setup, split, "--steps", "4", "--stop-at-step", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(split)] == ["ckpt-00000002.pth"]
    assert len(load_newest(split)["ranks"]) == 2
    done = torchrun(argv_for(setup, split, "--steps", "4", "--resume", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun(argv_for(setup, tmp_path / "straight", "--steps", "4"))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_newest(tmp_path / "straight"), load_newest(split)
    assert a["step"] == 4 and len(b["ranks"]) == 2
    assert_same_weights(a, b)
    assert records(split) == records(tmp_path / "straight")
