"""Stage A / stage B training of the interpretation model: what is frozen, what learns, the schedule, exact resume
(also from an older version's run folder, and with two gloo processes), the CLIs."""
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interpretation import train as vqa_train
from interpretation.data import DataFormatError
from interpretation.model import PromptError
from interpretation.tiny import make_tiny_lm
from training.checkpoint_files import RunError
from training.options import UsageError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "datasets" / "examples"
ROWS = [("ct/thorax_vertebra.png", "ct", "What imaging modality is this?", "CT", "open"),
        ("mri/mr_small.png", "mri", "Is this an MRI scan?", "yes", "closed"),
        ("fundus/retina.png", "fundus", "Is this a CT scan?", "no", "closed"),
        ("pathology/ihc_colon.png", "pathology", "What imaging modality is this?", "pathology", "open")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    lm = make_tiny_lm(root / "lm", seed=0, hidden_size=32, num_heads=2)
    qa = root / "qa.csv"
    qa.write_text("image,modality,question,answer,answer_type\n"
                  + "".join(f"{i},{m},{q},{a},{t}\n" for i, m, q, a, t in ROWS))
    captions = root / "captions.csv"
    captions.write_text("identifier,caption,modality\n" + "".join(f"{i},An image of {m}.,{m}\n" for i, m, *_ in ROWS))
    return {"root": root, "lm": lm, "qa": qa, "captions": captions}


def args_for(setup, stage, out, *extra):
    data = setup["captions"] if stage == "A" else setup["qa"]
    return vqa_train.parse_args([
        "--stage", stage, "--language-model", str(setup["lm"]), "--data", str(data), "--image-root", str(EXAMPLES),
        "--out", str(out), "--img-size", "32", "--batch-size", "2", "--lr", "1e-2", "--lora-r", "4",
        "--lora-alpha", "8", "--lora-dropout", "0.3", "--log-every", "1", "--device", "cpu", "--warmup-ratio", "0",
        *extra])


def batch_of(model, setup, captions):
    records = vqa_train.read_many([setup["captions"] if captions else setup["qa"]], image_root=EXAMPLES,
                                  captions=captions)
    dataset = vqa_train.ConversationDataset(records, model, captions, 256)
    return vqa_train.collate([dataset[i] for i in range(len(dataset))], model.tokenizer.pad_token_id)


def test_stage_a_trains_the_projector_only(setup, tmp_path):
    args = args_for(setup, "A", tmp_path)
    model = vqa_train.build_model(args, torch.device("cpu"))
    assert set(vqa_train.trainable_parameters(model)) == {f"projector.{k}" for k in model.projector.state_dict()}
    batch = batch_of(model, setup, captions=True)
    model.train()
    model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_stage_b_changes_only_lora_and_projector(setup, tmp_path):
    args = args_for(setup, "B", tmp_path)
    model = vqa_train.build_model(args, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = set(vqa_train.trainable_parameters(model))
    assert trainable and all(n.startswith("projector.") or ".lora_" in n for n in trainable)
    optimizer = vqa_train.make_optimizer(model, args)
    batch = batch_of(model, setup, captions=False)
    model.train()
    for _ in range(3):  # LoRA's A matrices get gradients from the second step on (B starts at zero)
        vqa_train.train_step(model, model, [batch], optimizer, torch.device("cpu"), False, args)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def run(setup, out, *extra):
    return vqa_train.train(args_for(setup, "B", out, "--epochs", "2", *extra))


@pytest.fixture(scope="module")
def straight_run(setup):
    """A 4-step stage-B run, unbroken (shared by the resume and evaluation tests)."""
    out = setup["root"] / "straight"
    summary = run(setup, out)
    assert summary["finished"] and summary["steps"] == 4
    return out


def test_exact_resume(setup, straight_run, tmp_path):
    first = run(setup, tmp_path / "split", "--stop-after-steps", "1")
    assert not first["finished"] and first["steps"] == 1
    assert not (tmp_path / "split" / "projector.safetensors").exists()
    second = run(setup, tmp_path / "split", "--resume", "auto")
    assert second["finished"] and second["steps"] == 4
    for name in ("projector.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(straight_run / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    metrics = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in (straight_run, tmp_path / "split")]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "split" / "args.json").read_text())["stage"] == "B"  # the run folder's layout
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]
    assert [m["epoch"] for m in metrics[1]] == [0, 0, 1, 1]
    # no warm-up: the peak, then cosine decay towards 0 at step 4 (the lr each step used)
    assert [m["lr"] for m in metrics[1]] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4))
                                                           for k in range(4)], rel=1e-12)
    names = sorted(p.name for p in (tmp_path / "split").glob("ckpt-*.pth*"))
    assert names == ["ckpt-00000001.pth", "ckpt-00000001.pth.sha256", "ckpt-00000004.pth",
                     "ckpt-00000004.pth.sha256"]


def test_the_learning_rate_schedule_against_an_independent_formula():
    """Each parameter group at its own peak: linear warm-up peak·(k+1)/w, then peak·½(1 + cos(π(k − w)/(T − w)));
    after the warm-up exactly the transformers cosine schedule the trainer used before, during it one step
    ahead of it (transformers starts at 0)."""
    from transformers import get_cosine_schedule_with_warmup

    peaks, total, warmup = [2e-3, 1e-2], 20, 5
    for k in range(total):
        want = [p * (k + 1) / warmup if k < warmup else
                p * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) for p in peaks]
        assert vqa_train.learning_rates(peaks, k, total, warmup) == pytest.approx(want, rel=1e-12, abs=1e-18)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule, before = get_cosine_schedule_with_warmup(optimizer, warmup, total), []
    for _ in range(total + 1):
        before.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    for k in range(total):
        (lr,) = vqa_train.learning_rates([1e-2], k, total, warmup)
        assert lr == pytest.approx(before[k + 1] if k < warmup else before[k], rel=1e-12, abs=1e-18), k


def test_evaluation_cli_on_a_trained_run(setup, straight_run, tmp_path):
    from evaluation import vqa as vqa_eval

    out = tmp_path / "eval"
    assert vqa_eval.main(["--run", str(straight_run), "--data", str(setup["qa"]), "--image-root", str(EXAMPLES),
                          "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "3", "--out", str(out)]) == 0
    report = json.loads((out / "vqa.json").read_text())
    (overall,) = [r for r in report["results"] if r["group"] == "all"]
    assert overall["questions"] == 4 and overall["closed_questions"] == 2
    rows = (out / "vqa_predictions.csv").read_text().splitlines()
    assert len(rows) == 5
    import csv

    scores = [vqa_eval.score(r["prediction"], r["reference"], r["answer_type"])["score"]
              for r in csv.DictReader(open(out / "vqa_predictions.csv"))]
    assert overall["score"] == pytest.approx(100 * sum(scores) / 4)
    markdown = (out / "vqa.md").read_text()
    assert "| MedITok (paper) | 52.99 | 49.02 | 48.09 |" in markdown and "RANDOM WEIGHTS" in markdown


def test_config_file_stages_and_unknown_keys(setup, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"language_model": "lm", "batch_size": 3, "stage_A": {"data": ["a.csv"], "out": "A"},
                                  "stage_B": {"data": ["b.json"], "out": "B", "lora_r": 2}}))
    a = vqa_train.parse_args(["--config", str(config), "--stage", "A"])
    b = vqa_train.parse_args(["--config", str(config), "--stage", "B", "--batch-size", "5"])
    assert (a.data, a.out, a.batch_size, a.lora_r) == (["a.csv"], "A", 3, 128)
    assert (b.data, b.out, b.batch_size, b.lora_r) == (["b.json"], "B", 5, 2)
    config.write_text(json.dumps({"language_model": "lm", "batchsize": 3}))
    with pytest.raises(UsageError, match=r"c\.json: unknown key\(s\) \['batchsize'\]"):
        vqa_train.parse_args(["--config", str(config), "--stage", "A"])


def test_training_data_without_placeholder_fails_naming_the_record(setup, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "ct/thorax_vertebra.png", "conversations": [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "CT"}]}]))
    args = args_for(setup, "B", tmp_path / "out")
    args.data = [str(bad)]
    with pytest.raises(PromptError, match=r"bad\.json:record 0: the prompt has no image placeholder '<image>'"):
        vqa_train.train(args)


def test_stage_b_with_a_projector_for_another_language_model(setup, tmp_path, capsys):
    other_lm = make_tiny_lm(tmp_path / "lm64", seed=0, hidden_size=64, num_heads=4)
    args = args_for(setup, "A", tmp_path / "A")
    args.language_model = str(other_lm)
    vqa_train.build_model(args, torch.device("cpu")).save_projector(tmp_path / "A" / "projector.safetensors")
    assert vqa_train.main(["--stage", "B", "--language-model", str(setup["lm"]), "--data", str(setup["qa"]),
                           "--image-root", str(EXAMPLES), "--out", str(tmp_path / "B"), "--img-size", "32",
                           "--init-projector", str(tmp_path / "A"), "--device", "cpu"]) == 2
    assert re.search(r"projector\.safetensors: the projector checkpoint has language-model hidden size 64, this model "
                     r"has 32", capsys.readouterr().err)


def test_gradient_checkpointing_leaves_the_gradients_unchanged(setup, tmp_path):
    grads = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        args = args_for(setup, "B", tmp_path, "--grad-ckpt", flag, "--lora-dropout", "0")
        model = vqa_train.build_model(args, torch.device("cpu"))
        with torch.no_grad():  # LoRA B starts at zero; make it non-zero so every LoRA weight gets a gradient
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        batch = batch_of(model, setup, captions=False)
        model.train()
        model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in vqa_train.trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("module", ["interpretation.train", "evaluation.vqa"])
def test_help_runs(module, capsys):
    import importlib

    parser = importlib.import_module(module).build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--data" in capsys.readouterr().out


def test_missing_images_are_reported_before_training(setup, tmp_path):
    args = args_for(setup, "B", tmp_path / "out")
    args.image_root = str(tmp_path / "elsewhere")
    with pytest.raises(DataFormatError, match=r"4 of 4 image file\(s\) not found \(.*qa\.csv:line 2: .*elsewhere/ct/"
                                         r"thorax_vertebra\.png.*check --image-root"):
        vqa_train.train(args)


def test_sigterm_to_the_process_group_saves_exits_143_and_resumes_exactly(setup, straight_run, tmp_path,
                                                                          run_signalled):
    """SIGTERM during step 2 of 4 of stage B: saved, exit 143 (it used to exit 0), no final outputs; --resume auto
    then ends equal to the unbroken run."""
    out = tmp_path / "stopped"
    argv = ["--stage", "B", "--language-model", str(setup["lm"]), "--data", str(setup["qa"]), "--image-root",
            str(EXAMPLES), "--out", str(out), "--img-size", "32", "--batch-size", "2", "--lr", "1e-2", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0.3", "--log-every", "1", "--device", "cpu", "--warmup-ratio", "0",
            "--epochs", "2"]
    proc = run_signalled("interpretation.train", "train_step", 2, "SIGTERM", argv)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "stopped (SIGTERM) at step 2/4" in proc.stdout, proc.stdout[-2000:]
    assert not (out / "projector.safetensors").exists()
    assert vqa_train.main(argv + ["--resume", "auto"]) == 0
    for name in ("projector.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(straight_run / name), load_file(out / name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"


@pytest.mark.parametrize("flag, value, says", [
    ("--batch-size", "0", "--batch-size must be a number > 0, got 0"),
    ("--log-every", "0", "--log-every must be a number > 0, got 0"),
    ("--epochs", "-1", "--epochs must be a number > 0, got -1.0"),
    ("--warmup-ratio", "2", "--warmup-ratio must be a number between 0 and 1, got 2.0"),
    ("--vision-tower", "missing.pth", "missing.pth"),
    ("--config", "missing.json", "--config missing.json: no such file"),
])
def test_bad_values_give_one_line_and_exit_2(setup, tmp_path, capsys, flag, value, says):
    argv = ["--stage", "A", "--language-model", str(setup["lm"]), "--data", str(setup["captions"]), "--image-root",
            str(EXAMPLES), "--out", str(tmp_path / "run"), "--img-size", "32", "--device", "cpu", flag, value]
    assert vqa_train.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def as_old_layout(run_dir: Path) -> None:
    """Turn a stopped run's folder into what the trainer wrote before the shared Checkpointer: one ckpt-last.pth
    (no checksum) holding one RNG state, a transformers scheduler state, no per-rank entries."""
    from transformers import get_cosine_schedule_with_warmup

    (path,) = run_dir.glob("ckpt-*.pth")
    new = torch.load(path, weights_only=True)
    step, optimizer_state = new["step"], new["optimizer"]
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": g["lr"]}
                                   for g in optimizer_state["param_groups"]])
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, new["args"]["epochs"] * 2)
    for _ in range(step):
        optimizer.step()
        schedule.step()
    for group in optimizer_state["param_groups"]:
        group["initial_lr"] = group["lr"]
    old = {"format": "meditok-interpretation-v1", "step": step, "stage": new["stage"], "args": new["args"],
           "trainable": new["trainable"], "optimizer": optimizer_state, "scheduler": schedule.state_dict(),
           "rng": new["ranks"][0]["rng"]}
    for leftover in [*run_dir.glob("ckpt-*"), run_dir / "healthy.json"]:
        leftover.unlink(missing_ok=True)
    torch.save(old, run_dir / "ckpt-last.pth")


def test_a_run_folder_of_the_old_layout_resumes_exactly_and_loads_for_inference(setup, straight_run, tmp_path):
    from interpretation import loading
    from interpretation.inference import load_trained

    out = tmp_path / "old"
    assert run(setup, out, "--stop-after-steps", "1")["steps"] == 1
    as_old_layout(out)
    assert loading.training_checkpoints(out) == [out / "ckpt-last.pth"]
    assert loading.load_checkpoint(out / "ckpt-last.pth")["ranks"][0]["rng"] is not None  # upgraded
    with pytest.raises(RunError, match="trainable parameters differ from this run's"):  # refused, folder unlocked
        run(setup, out, "--resume", "auto", "--lora-r", "2")
    with pytest.raises(RunError, match="already holds checkpoints of a run"):  # no --resume: never overwritten
        run(setup, out)
    summary = run(setup, out, "--resume", "auto")
    assert summary["finished"] and summary["steps"] == 4
    assert (out / "ckpt-last.pth").is_file() and (out / "ckpt-00000004.pth").is_file()
    for name in ("projector.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(straight_run / name), load_file(out / name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    model, description = load_trained(out, "cpu")
    reference, _ = load_trained(straight_run, "cpu")
    assert description["stage"] == "B" and description["lora"] == "lora"
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_two_gloo_processes_stopped_and_resumed_equal_an_unbroken_two_process_run(setup, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 1 each: stopped after step 1 of 4 and resumed with --resume
    auto (every rank restores its own RNG states from the checkpoint), the trainable weights equal those of an
    unbroken 2-process run."""
    def torchrun(out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "-m", "interpretation.train", "--stage", "B", "--language-model",
                   str(setup["lm"]), "--data", str(setup["qa"]), "--image-root", str(EXAMPLES), "--out", str(out),
                   "--img-size", "32", "--batch-size", "1", "--lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
                   "--lora-dropout", "0.3", "--log-every", "1", "--device", "cpu", "--warmup-ratio", "0.25",
                   "--epochs", "2", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    torchrun(tmp_path / "unbroken")
    torchrun(tmp_path / "split", "--stop-after-steps", "1")
    assert not (tmp_path / "split" / "projector.safetensors").exists()
    ranks = torch.load(tmp_path / "split" / "ckpt-00000001.pth", weights_only=True)["ranks"]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])  # LoRA dropout: each rank its own
    torchrun(tmp_path / "split", "--resume", "auto")
    ckpt = torch.load(tmp_path / "split" / "ckpt-00000004.pth", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["ranks"]) == 2
    for name in ("projector.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "unbroken" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
