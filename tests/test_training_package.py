"""The pieces every trainer shares (training/): schedules, optimiser grouping, MFU peak, option checks, worker
shut-down, each against a reference written here."""
import math

import pytest
import torch

from training import flops, optim, options, schedules, workers


def test_cosine_schedule_against_the_formula_and_its_constant_form():
    peak, floor, warmup, total = 3e-4, 3e-5, 20, 200
    for step in range(total + 5):
        if step < warmup:
            want = peak * (step + 1) / warmup
        else:
            t = min((step - warmup) / (total - warmup), 1.0)
            want = floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2
        assert schedules.cosine_lr(step, total, peak, floor, warmup) == pytest.approx(want, rel=1e-12)
    # floor == peak: exactly the peak after warm-up (the AR generator's constant rate), whatever the total
    assert {schedules.cosine_lr(s, 0, 1e-4, 1e-4, 5) for s in range(5, 50)} == {1e-4}
    assert schedules.cosine_lr(total, total, peak, floor, warmup) == pytest.approx(floor)


def test_the_trainers_schedules_are_the_shared_one():
    from generation.diffusion.train import lr_at
    from generation.train_ar import TrainConfig, learning_rate
    assert [lr_at(s, 1.0, 3, 10) for s in range(12)] == [schedules.cosine_lr(s, 10, 1.0, 0.1, 3) for s in range(12)]
    config = TrainConfig(lr=2e-4, warmup_steps=4)
    assert [learning_rate(config, s) for s in range(8)] == [2e-4 * (s + 1) / 4 for s in range(4)] + [2e-4] * 4


def test_decay_groups_put_matrices_in_one_group_and_leave_frozen_parameters_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(3, 4))
    model[0].bias.requires_grad_(False)
    groups = optim.decay_groups(model.parameters(), 0.05)
    assert [id(p) for p in groups[0]["params"]] == [id(model[0].weight), id(model[2].weight)]
    assert [id(p) for p in groups[1]["params"]] == [id(model[1].weight), id(model[1].bias)]
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.05, 0.0)
    opt = optim.adamw(model.parameters(), 1e-3, 0.05, (0.8, 0.9))
    assert opt.defaults["betas"] == (0.8, 0.9) and len(opt.param_groups) == 2


def test_peak_flops():
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops(torch.device("cpu"), override_tflops=2.5) == 2.5e12


def test_option_checks_name_each_bad_value():
    problems = options.check_numbers({"a": 0, "b": -1, "c": 1.5, "d": None, "e": float("nan"), "f": "x"},
                                     positive=("a", "d"), non_negative=("b", "e", "f"), unit_interval=("c",))
    assert problems == ["--a must be a number > 0, got 0", "--b must be a number >= 0, got -1",
                        "--e must be a number >= 0, got nan", "--f must be a number >= 0, got 'x'",
                        "--c must be a number between 0 and 1, got 1.5"]
    from generation.train_ar import TrainConfig
    # in field order; an int is a valid float, a 1 is not a bool
    assert options.check_field_types({"lr": "fast", "batch_size": 2.5, "bf16": 1, "epochs": 3}, TrainConfig) == [
        "--batch-size must be int, got 2.5", "--lr must be float, got 'fast'", "--bf16 must be bool, got 1"]


def test_shutdown_workers_ends_persistent_workers_and_is_idempotent():
    import multiprocessing
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    before = set(multiprocessing.active_children())
    next(iter(loader))
    assert len(set(multiprocessing.active_children()) - before) == 2
    workers.shutdown_workers(loader)
    workers.shutdown_workers(loader, None)
    assert not set(multiprocessing.active_children()) - before


def test_stop_at_step_stops_exactly_there_so_a_resumed_run_goes_on():
    """The same command with --resume auto appended must continue past the step it stopped at, not stop again
    after one more step (the VQA trainer's --stop-after-steps did, for a while)."""
    from training.stopping import StopRequests
    stops = StopRequests(sync_every=1, stop_at_step=3, name="test")
    try:
        assert [bool(stops.should_stop(s, 10)) for s in range(1, 10)] == [s == 3 for s in range(1, 10)]
        assert stops.final_exit_code("stop at step 3") == 0 and stops.final_exit_code("") == 0
    finally:
        stops.close()


def test_a_signal_sets_the_exit_status_and_the_handlers_are_given_back():
    import os
    import signal

    from training.stopping import StopRequests
    before = signal.getsignal(signal.SIGTERM)
    stops = StopRequests(name="test")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        reason = stops.should_stop(1, 10)
        assert reason == "SIGTERM" and stops.final_exit_code(reason) == 143
        assert stops.should_stop(10, 10) == ""  # never after the last step
    finally:
        stops.close()
    assert signal.getsignal(signal.SIGTERM) is before
