"""The training-step benchmark runs on CPU (tiny networks) for both stages and reports what it promises."""
import json

import pytest

from evaluation import benchmark


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    from local_openclip.tiny import make_tiny_biomedclip
    from utilities.discriminator import make_tiny_dino
    out = tmp_path_factory.mktemp("tiny")
    return ["--biomedclip", str(make_tiny_biomedclip(out / "biomedclip")), "--dino", str(make_tiny_dino(out / "dino")),
            "--lpips-vgg", "random"]


@pytest.mark.parametrize("stage", [1, 2])
def test_benchmark_times_the_training_step_and_token_api(stage, tiny_sources, tmp_path):
    argv = ["--preset", "tiny", "--img-size", "32", "--batch-sizes", "2", "3", "--steps", "2", "--warmup", "1",
            "--device", "cpu", "--stage", str(stage), "--inference-settings", "2x32", "--out", str(tmp_path),
            *tiny_sources]
    if stage == 2:
        argv += ["--real-data", "--num-workers", "0"]
    assert benchmark.main(argv) == 0
    report = json.loads((tmp_path / "benchmark.json").read_text())
    steps = report["train_step"]
    assert [c["batch"] for c in steps][:2] == [2, 3]
    for cell in steps:
        assert cell["images_per_s"] > 0 and cell["step_ms_p90"] >= cell["step_ms_p50"] > 0
        assert cell["losses_finite"]
        # every loss was on: adversarial and contrastive terms are present and non-zero
        assert cell["last_losses"]["loss/g_adv"] != 0 and cell["last_losses"]["loss/contrast"] > 0
    if stage == 2:
        assert steps[-1]["data"].startswith("loader(")
    assert {r["task"] for r in report["inference"]} == {"tokenize", "decode", "reconstruct"}
    assert report["environment"]["tokenizer_gflops_per_image_train"] > 0
    assert "| tokenize | 2 | 32 |" in (tmp_path / "benchmark.md").read_text()
