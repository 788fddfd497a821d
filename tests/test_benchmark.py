"""The training-step benchmark runs on CPU (tiny networks) for both stages and reports what it promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer_training import benchmark


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    from local_openclip.tiny import make_tiny_biomedclip
    from tokenizer_training.discriminator import make_tiny_dino
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


def _load_script(name):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["tokenize", "train"])
def test_kernel_profile_attributes_time_to_model_parts(workload, tmp_path):
    profile = _load_script("profile_kernels")
    out = tmp_path / "prof.json"
    assert profile.main(["--preset", "tiny", "--img-size", "32", "--batch", "2", "--device", "cpu", "--workload",
                         workload, "--warmup", "1", "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    parts = {p["part"]: p["ms_per_iter"] for p in result["parts_forward"]}
    assert {"encoder conv front", "encoder ViT", "bottleneck (in)"} <= set(parts)
    if workload == "train":  # the quantizer's forward and the decoder run only in the training pass
        assert {"quantizer", "decoder ViT", "decoder up_conv2", "decoder up_conv4 (inverse stem)"} <= set(parts)
    assert all(v >= 0 for v in parts.values()) and result["total_ms_per_iter"] > 0
    assert result["ops"] and abs(sum(o["share"] for o in result["ops"])) <= 1.0 + 1e-6
    assert (tmp_path / "prof.md").read_text().startswith(f"## {workload}, tiny")


def test_tokenizer_step_benchmark_runs_with_speed_options(tmp_path, monkeypatch):
    step = _load_script("tokenizer_train_step")
    out = tmp_path / "step.json"
    monkeypatch.setattr("sys.argv", ["tokenizer_train_step.py", "--preset", "tiny", "--img-size", "32", "--batch", "2",
                                     "--device", "cpu", "--dtype", "fp32", "--warmup", "1", "--iters", "1",
                                     "--channels-last", "--out", str(out)])
    assert step.main() == 0
    (record,) = json.loads(out.read_text())["results"]
    assert record["channels_last"] and record["images_per_s"] > 0 and record["loss"] == record["loss"]


def test_gpu_ab_script_runs_end_to_end_in_smoke_mode(tmp_path):
    """benchmarks/gpu_ab.sh (the one GPU call that times every speed variant against the baseline) with
    GPU_AB_SMOKE=1: the same commands on CPU with the tiny preset. It must exit 0, write one JSON with a row per
    variant and workload, and print the A/B table last."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPU_AB_SMOKE": "1", "GPU_AB_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "benchmarks/gpu_ab.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_ab.json").read_text())
    assert all(c["rc"] == 0 for c in result["commands"]), result["commands"]
    assert not result["skipped"]
    rows = {(r["workload"], r["variant"]): r for r in result["rows"]}
    for task in ("tokenize", "reconstruct"):
        for variant in ("baseline", "upsample_direct", "cuda_graphs", "regional_compile"):
            assert rows[(task, variant)]["images_per_s"] > 0, (task, variant)
    # on the CPU the CUDA-graph variant runs the eager code: identical outputs
    assert rows[("tokenize", "cuda_graphs")]["numerics"] == "ids 100.00 %"
    assert rows[("reconstruct", "cuda_graphs")]["numerics"] == "max|d| 0.0e+00"
    assert rows[("reconstruct", "upsample_direct")]["numerics"].startswith("max|d| ")
    base, ckpt = rows[("train stage 1", "baseline")], rows[("train stage 1", "ckpt_vit_selective_conv")]
    assert base["images_per_s"] > 0 and ckpt["images_per_s"] > 0 and base["speedup"] == 1.0
    assert (tmp_path / "out" / "gpu_ab_runs.tar.gz").exists()
    last = done.stdout.strip().splitlines()
    assert last[-1].startswith("| ") and any(line.startswith("| workload | variant |") for line in last[-len(result["rows"]) - 3:])
