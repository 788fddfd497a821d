"""What the evaluation CLIs print before long work: the device chosen, and progress bars that do not pile up
in log files."""
import io
import time

import torch
from tqdm import tqdm

from evaluation import efficiency
from evaluation.progress import LOG_INTERVAL_S, progress_options


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _refreshes(stream, options, steps=30, pause=0.01):
    with tqdm(range(steps), file=stream, **options) as bar:
        for _ in bar:
            time.sleep(pause)
    return stream.getvalue().count("\r")


def test_bars_in_a_log_file_refresh_rarely_and_in_a_terminal_as_usual():
    assert progress_options(_Terminal()) == {}
    log_options = progress_options(io.StringIO())
    assert log_options["mininterval"] == LOG_INTERVAL_S
    # 30 steps over ~0.3 s: tqdm's default (0.1 s) redraws several times; in a log only start and end remain
    assert _refreshes(io.StringIO(), {}) > _refreshes(io.StringIO(), log_options) == 2


def test_efficiency_on_cpu_names_the_device_and_estimates_the_work(capsys):
    efficiency.announce_device(torch.device("cpu"), "tiny", [(4, 64), (2, 128)], ["tokenize", "reconstruct"],
                               ["fp32"], calls_per_cell=3)
    out = capsys.readouterr().out
    assert out.startswith("device: cpu") and "--device cuda" in out
    assert "warning: running the 'tiny' grid on the CPU: 4 cells" in out
    # the TFLOP figure is the sum over cells of batch × calls × FLOPs per image, counted independently here
    from meditok.info import forward_flops
    model = efficiency.meditok.build_meditok("tiny", empty=True)
    f64, f128 = forward_flops(model, 64), forward_flops(model, 128)
    expected = 3 * (4 * (2 * f64["encode"] + f64["decode"]) + 2 * (2 * f128["encode"] + f128["decode"]))
    assert f" {efficiency.flop_text(expected)} in all" in out
    assert efficiency.flop_text(1.4649e15) == "1.46 PFLOP" and efficiency.flop_text(2.5e10) == "25 GFLOP"


def test_efficiency_with_a_checkpoint_names_the_device_only(capsys):
    efficiency.announce_device(torch.device("cpu"), None, [(4, 64)], ["tokenize"], ["fp32"], calls_per_cell=1)
    assert capsys.readouterr().out.strip().splitlines() == [
        "device: cpu (no CUDA GPU found or chosen; pass --device cuda on a GPU machine)"]
