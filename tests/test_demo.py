"""demo.py and demo.ipynb run on the example data with a tiny checkpoint and write their figures."""
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


def test_demo_reports_bad_files_in_one_line_and_goes_on(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    good = [p for p, _ in demo.default_images()][:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    missing = tmp_path / "missing.dcm"
    argv = [str(good[0]), str(broken), str(missing), str(good[1]), "--checkpoint", str(ckpt),
            "--out", str(tmp_path / "out")]
    assert demo.main(argv) == 1  # non-zero: some files failed
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.strip().startswith("skipped")]
    assert len(skipped) == 2 and str(broken) in skipped[0] and str(missing) in skipped[1]
    assert "Traceback" not in captured.err + captured.out
    for path in good:  # the files after the bad ones were processed too
        assert (tmp_path / "out" / f"{path.stem}.png").is_file()
    assert (tmp_path / "out" / "summary.png").is_file()
    assert "mean over 2 images" in captured.out and "2 file(s) skipped" in captured.out


def test_summary_rows_are_labelled_and_the_grid_is_unchanged(tmp_path):
    """row_labels add a left margin with the texts; the grid itself is pixel for pixel the unlabelled one."""
    import numpy as np
    from PIL import Image
    from tokenizer_training.monitor import save_reconstruction_grid
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    plain = np.asarray(Image.open(save_reconstruction_grid(x, y, tmp_path / "plain.png")))
    labelled = np.asarray(Image.open(save_reconstruction_grid(x, y, tmp_path / "lab.png",
                                                              row_labels=["a.png (ct) 20.1 dB", "b (mri)"])))
    margin = labelled.shape[1] - plain.shape[1]
    assert margin > 20 and labelled.shape[0] == plain.shape[0]
    np.testing.assert_array_equal(labelled[:, margin:], plain)
    half = plain.shape[0] // 2  # each label is drawn beside its own row
    assert (labelled[16:half, :margin] < 128).any() and (labelled[half:, :margin] < 128).any()


def test_demo_figure_leaves_the_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend must survive the demo: saving a figure may not switch backends."""
    import matplotlib
    import matplotlib.pyplot as plt
    before = matplotlib.get_backend()
    plt.switch_backend("template")  # stands for the notebook's backend: any backend but Agg
    try:
        x = torch.zeros(3, 32, 32)
        demo.save_figure(x, x + 0.2, "t", tmp_path / "f.png")
        assert matplotlib.get_backend() == "template"
        assert (tmp_path / "f.png").stat().st_size > 1000
    finally:
        plt.switch_backend(before)


def test_error_maps_are_labelled_one_way_across_figures():
    """demo figures, evaluation.reconstruction's worst cases and the training grids share one scale and title."""
    import inspect

    from evaluation import reconstruction
    from tokenizer_training import monitor
    assert demo.ERROR_LABEL == reconstruction.ERROR_LABEL == "|error| (0-0.5)"
    assert demo.ERROR_VMAX == reconstruction.ERROR_VMAX == 0.5
    grid_source = inspect.getsource(monitor.save_reconstruction_grid)
    assert f'"{demo.ERROR_LABEL}"' in grid_source
    assert inspect.signature(monitor.error_map).parameters["vmax"].default == demo.ERROR_VMAX
