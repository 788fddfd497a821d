"""training.config: a dataclass becomes a command line and a config-file reader, for any trainer."""
import json
from dataclasses import dataclass
from typing import Tuple

import pytest

from training import config
from training.options import ArgumentParser


@dataclass
class Settings:
    lr: float = 1e-3  # peak learning rate
    steps: int = 10  # optimiser steps
    betas: Tuple[float, float] = (0.9, 0.95)  # AdamW betas
    deterministic: bool = False  # bit-exact kernels
    data_csv: str = "datasets/meta/examples_train.csv"  # training images
    output_dir: str = "runs/x"  # run folder


def parse(argv, tmp_path=None, file_values=None):
    parser = ArgumentParser(prog="prog")
    parser.add_argument("--config", default="")
    config.add_dataclass_flags(parser, Settings, aliases={"output_dir": ["--out"]})
    ns = parser.parse_args(argv)
    values = {**config.read_config_file(ns.config, path_args=("data_csv",)), **config.given(ns)}
    return config.from_dict(Settings, values, source=ns.config or "command line")


def test_flags_from_fields_with_both_spellings_bools_tuples_and_aliases():
    s = parse(["--lr", "0.5", "--betas", "0.8", "0.9", "--deterministic", "--out", "r", "--data_csv", "a.csv"])
    assert s == Settings(lr=0.5, betas=(0.8, 0.9), deterministic=True, output_dir="r", data_csv="a.csv")
    assert parse(["--deterministic", "false"]).deterministic is False


def test_help_text_is_the_field_comment():
    parser = ArgumentParser(prog="prog")
    config.add_dataclass_flags(parser, Settings)
    assert "peak learning rate (default: 0.001)" in " ".join(parser.format_help().split())


def test_command_line_wins_over_the_file_and_repo_relative_paths_resolve(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "x", "lr": 2, "steps": 5, "data_csv": "datasets/meta/examples_train.csv"}))
    monkeypatch.chdir(tmp_path)  # the CSV does not exist relative to here: resolved against the repository
    s = parse(["--config", str(path), "--steps", "7"])
    assert (s.lr, s.steps) == (2.0, 7)
    assert s.data_csv == str(config.REPO / "datasets/meta/examples_train.csv")


@pytest.mark.parametrize("values, says", [({"lr": "fast"}, "'lr' must be a number"),
                                          ({"steps": 2.5}, "'steps' must be a whole number"),
                                          ({"betas": [1]}, "'betas' must be a list of 2 numbers"),
                                          ({"deterministic": "yes"}, "'deterministic' must be true or false"),
                                          ({"epochs": 3}, "unknown argument(s) ['epochs']")])
def test_bad_file_values_name_the_key_and_the_file(tmp_path, values, says):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as error:
        parse(["--config", str(path)])
    assert says in str(error.value) and str(path) in str(error.value)


def test_a_file_that_is_not_a_json_object_is_refused(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        config.read_config_file(str(path))
    path.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        config.read_config_file(str(path))


def test_a_config_file_as_argparse_defaults_for_parser_based_trainers(tmp_path):
    """The diffusion and VQA trainers keep an argparse parser: the file's values become its defaults (kebab- or
    snake-case keys), the command line still wins, ``select`` picks a section, unknown keys name the file."""
    from training.options import UsageError

    def parser():
        p = ArgumentParser(prog="prog")
        p.add_argument("--config", default="")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--out", default="o")
        return p
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch-size": 4, "out": "from-file", "stage_B": {"out": "b"}}))
    p = parser()
    applied = config.config_file_as_defaults(p, str(path), select=lambda v: {**{k: x for k, x in v.items()
                                                                                  if k != "stage_B"}, **v["stage_B"]})
    assert applied == {"batch_size": 4, "out": "b"}
    ns = p.parse_args(["--out", "cli"])
    assert (ns.batch_size, ns.out) == (4, "cli")
    assert config.config_file_as_defaults(parser(), "") == {}
    path.write_text(json.dumps({"batchsize": 3}))
    with pytest.raises(UsageError, match=r"c\.json: unknown key\(s\) \['batchsize'\]"):
        config.config_file_as_defaults(parser(), str(path))
