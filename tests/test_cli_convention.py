"""One command-line convention for the four trainers: --config NAME|PATH, --out, --precision auto|fp32|bf16,
--resume auto|restart|PATH, --seed, --device; kebab-case flags with their snake_case spelling accepted; a bad value
is one line and exit status 2."""
import pytest

from generation import train_ar
from generation.diffusion import train as diffusion_train
from interpretation import train as vqa_train
from tokenizer_training import args as tokenizer_args

VQA_REQUIRED = ["--stage", "A", "--language-model", "lm", "--data", "d.csv", "--out", "o"]


def tokenizer(argv):
    a = tokenizer_args.parse_args(argv)
    return {"out": a.output_dir, "precision": a.precision, "resume": a.resume, "seed": a.seed, "device": a.device,
            "batch_size": a.batch_size}


def ar(argv):
    c = train_ar.parse_args(["--train-cache", "c"] + argv)
    return {"out": c.out, "precision": c.precision, "resume": c.resume, "seed": c.seed, "device": c.device,
            "batch_size": c.batch_size}


def diffusion(argv):
    a = diffusion_train.parse_args(["--cache", "c"] + argv)
    return {"out": a.out, "precision": a.precision, "resume": a.resume, "seed": a.seed, "device": a.device,
            "batch_size": a.batch_size}


def vqa(argv):
    a = vqa_train.parse_args(VQA_REQUIRED + argv)
    return {"out": a.out, "precision": a.precision, "resume": a.resume, "seed": a.seed, "device": a.device,
            "batch_size": a.batch_size}


TRAINERS = {"tokenizer": (tokenizer, "stage1_tiny_cpu"), "ar": (ar, "synthesis_tiny_cpu"),
            "diffusion": (diffusion, "diffusion_tiny_cpu"), "vqa": (vqa, "vqa_tiny_cpu")}


@pytest.mark.parametrize("name", TRAINERS)
def test_the_shared_flags_mean_the_same_everywhere(name):
    parse, _ = TRAINERS[name]
    got = parse(["--out", "runs/x", "--precision", "bf16", "--resume", "restart", "--seed", "7", "--device", "cpu",
                 "--batch_size", "3"])  # snake_case spelling of a kebab-case flag
    assert got == {"out": "runs/x", "precision": "bf16", "resume": "restart", "seed": 7, "device": "cpu",
                   "batch_size": 3}


@pytest.mark.parametrize("name", TRAINERS)
def test_config_by_name_and_a_missing_one_in_one_line(name, capsys):
    parse, config = TRAINERS[name]
    assert parse(["--config", config])["batch_size"] > 0  # a configs/ name, as well as a path
    with pytest.raises(SystemExit) as caught:
        try:
            parse(["--config", "no_such_config"])
        except ValueError as error:  # a trainer's main turns this into the same one line, exit 2
            raise SystemExit(2) from error
    assert caught.value.code == 2


@pytest.mark.parametrize("name", TRAINERS)
def test_a_bad_precision_is_one_line_and_exit_2(name, capsys):
    parse, _ = TRAINERS[name]
    with pytest.raises((SystemExit, ValueError)) as caught:
        parse(["--precision", "fp16"])
    if isinstance(caught.value, SystemExit):
        assert caught.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--precision" in err, err
    else:
        assert "--precision" in str(caught.value)


def test_the_older_precision_spellings_still_work():
    import torch
    cpu = torch.device("cpu")
    assert vqa_train.use_bf16(vqa_train.parse_args(VQA_REQUIRED + ["--bf16", "true"]), cpu)
    assert not vqa_train.use_bf16(vqa_train.parse_args(VQA_REQUIRED + ["--bf16", "false", "--precision", "bf16"]), cpu)
    assert vqa_train.use_bf16(vqa_train.parse_args(VQA_REQUIRED + ["--precision", "bf16"]), cpu)
    assert not vqa_train.use_bf16(vqa_train.parse_args(VQA_REQUIRED), cpu)  # auto on a CPU: fp32
    assert train_ar.parse_args(["--train-cache", "c", "--bf16", "false"]).bf16 is False
