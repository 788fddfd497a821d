"""The info and efficiency CLIs run end to end on CPU and report numbers that agree with the model."""
import json
import subprocess
import sys
from pathlib import Path

import meditok
from meditok.info import main as info_main, preset_info

ROOT = Path(__file__).resolve().parents[1]


def test_info_counts_add_up_and_match_the_model(capsys):
    info = preset_info("large")
    p = info["parameters"]
    model = meditok.build_meditok("large", empty=True)
    assert p["total"] == sum(t.numel() for t in model.parameters())
    assert sum(v for k, v in p.items() if k != "total") == p["total"]
    # the released tensors minus the buffers (8 usage vectors of 4096, two zero key biases of 1024)
    released = sum(eval("*".join(map(str, s)) or "1") for _, s in
                   json.loads((ROOT / "tests/data/meditok_official_state_dict_keys.json").read_text()))
    assert p["total"] == released - 8 * 4096 - 2 * 1024
    assert info["token_grid"] == [8, 16, 16] and info["tokens_per_image"] == 2048
    # FLOPs: the decoder (full-resolution convs) costs more than the encoder; 512 px ≈ 4× 256 px
    assert info["gflops_decode"] > info["gflops_encode"] > 100
    info512 = preset_info("large", img_size=512)
    assert 3.5 < info512["gflops_encode"] / info["gflops_encode"] < 5
    assert info_main(["tiny", "large"]) == 0
    table = capsys.readouterr().out
    assert "| tiny | 128 | 8×8×8 |" in table and "**696.65 M**" in table


def test_info_rejects_unknown_presets():
    proc = subprocess.run([sys.executable, "-m", "meditok.info", "huge"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown preset(s) ['huge']" in proc.stderr


def test_efficiency_cli_writes_its_tables(tmp_path):
    out = tmp_path / "eff"
    proc = subprocess.run([sys.executable, "-m", "evaluation.efficiency", "--preset", "tiny", "--device", "cpu",
                           "--settings", "2x64", "--dtypes", "fp32", "--iters", "2", "--warmup", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "efficiency.json").read_text())
    tasks = {r["task"] for r in report["records"]}
    assert tasks == {"tokenize", "decode", "reconstruct"}
    for r in report["records"]:
        assert r["images_per_s"] > 0 and r["batch"] == 2 and r["img_size"] == 64
    assert "| tokenize | fp32 | 2 | 64 |" in (out / "efficiency.md").read_text()
    assert (out / "efficiency.csv").read_text().startswith("task,")
