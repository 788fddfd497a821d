"""Stage A / stage B training of the interpretation model: what is frozen, what learns, exact resume, the CLIs."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interpretation import train as vqa_train
from interpretation.tiny import make_tiny_lm

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
    from transformers import get_constant_schedule

    scheduler = get_constant_schedule(optimizer)
    batch = batch_of(model, setup, captions=False)
    model.train()
    for _ in range(3):  # LoRA's A matrices get gradients from the second step on (B starts at zero)
        vqa_train.train_step(model, model, [batch], optimizer, scheduler, torch.device("cpu"), False, args)
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
    assert [m["loss"] for m in metrics[0]] == [m["loss"] for m in metrics[1]]


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
    with pytest.raises(SystemExit, match=r"c\.json: unknown key\(s\) \['batchsize'\]"):
        vqa_train.parse_args(["--config", str(config), "--stage", "A"])


def test_training_data_without_placeholder_fails_naming_the_record(setup, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "ct/thorax_vertebra.png", "conversations": [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "CT"}]}]))
    args = args_for(setup, "B", tmp_path / "out")
    args.data = [str(bad)]
    with pytest.raises(SystemExit, match=r"bad\.json:record 0: the prompt has no image placeholder '<image>'"):
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
    with pytest.raises(SystemExit, match=r"4 of 4 image file\(s\) not found \(.*qa\.csv:line 2: .*elsewhere/ct/"
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
