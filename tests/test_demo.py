"""demo.py and demo.ipynb run on the example data with a tiny checkpoint and write their figures."""
import json
from pathlib import Path

import torch

import demo
import meditok

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    return meditok.save_meditok(meditok.build_meditok("tiny", img_size=64), tmp_path / "tok")


def test_demo_writes_figures_and_metrics(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    assert demo.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    names = [Path(p).stem for p, _ in demo.default_images()]
    for name in names:
        assert (tmp_path / "out" / f"{name}.png").exists()
    assert (tmp_path / "out" / "summary.png").exists()
    assert "token ids (1, 8, 16)" in out and "PSNR" in out and "SSIM" in out


def test_demo_quality_matches_skimage_on_uint8_images():
    from skimage.metrics import peak_signal_noise_ratio
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.05 * torch.randn(3, 32, 32, generator=g)).clamp(-1, 1)
    psnr, ssim = demo.quality(a, b)
    to01 = lambda t: (t.add(1).mul(127.5).round() / 255).permute(1, 2, 0).numpy()
    assert abs(psnr - peak_signal_noise_ratio(to01(a), to01(b), data_range=1.0)) < 1e-6
    assert 0 < ssim < 1


def test_demo_without_any_checkpoint_explains_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "CANDIDATES", (tmp_path / "nothing.pth",))
    try:
        demo.find_checkpoint()
    except SystemExit as e:
        assert "hf download massaki75/meditok" in str(e) and "train_stage1.sh" in str(e)
    else:
        raise AssertionError("expected SystemExit")


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path)
    monkeypatch.setenv("MEDITOK_DEMO_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    (tmp_path / "datasets").symlink_to(ROOT / "datasets")
    monkeypatch.chdir(tmp_path)
    notebook = json.loads((ROOT / "demo.ipynb").read_text())
    namespace = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "demo.ipynb", "exec"), namespace)
    assert (tmp_path / "outputs/demo_notebook/summary.png").exists()
    assert tuple(namespace["ids"].shape) == (1, 8, 16)
