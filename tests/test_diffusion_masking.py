"""Masking schedule, forward masking per task, and the ELBO-weighted loss against explicit references."""
import math

import pytest
import torch
import torch.nn.functional as F

from generation.diffusion.masking import TASKS, MaskSchedule, TaskMix, forward_mask, part_loss

TEXT_MASK, IMAGE_MASK = 50, 64


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
def test_expected_mask_ratio_matches_formula(name):
    schedule = MaskSchedule(name, eps=1e-3)
    formula = {"loglinear": lambda t: (1 - 1e-3) * t, "cosine": lambda t: 1 - math.cos(math.pi * t / 2)}[name]
    b, lt, n = 4, 20000, 5000
    text = torch.zeros(b, lt, dtype=torch.long)
    image = torch.zeros(b, 8, n, dtype=torch.long)
    ts = torch.tensor([0.1, 0.35, 0.6, 0.95])
    noised = forward_mask(text, image, schedule, text_mask_id=TEXT_MASK, image_mask_id=IMAGE_MASK,
                          task=torch.zeros(b, dtype=torch.long), t_text=ts, t_image=ts,
                          generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ts.tolist()):
        expected = formula(t)
        assert schedule.mask_prob(torch.tensor(t)).item() == pytest.approx(expected, abs=1e-6)
        # binomial standard error ≤ 0.0035 at lt = 20000 / n = 5000: 5σ tolerance
        assert (noised.text_ids[i] == TEXT_MASK).float().mean().item() == pytest.approx(expected, abs=0.018)
        assert noised.image_mask[i].float().mean().item() == pytest.approx(expected, abs=0.035)
        # positions are masked as a whole: all 8 codes or none
        codes = noised.image_ids[i] == IMAGE_MASK
        assert torch.equal(codes.all(dim=0), codes.any(dim=0))


@pytest.mark.parametrize("name", ["loglinear", "cosine"])
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    schedule = MaskSchedule(name)
    t = torch.tensor([0.05, 0.3, 0.7, 0.99], dtype=torch.float64)
    h = 1e-6
    alpha_prime = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    expected = -alpha_prime / (1 - schedule.alpha(t))
    assert torch.allclose(schedule.weight(t), expected, rtol=1e-4)


def test_tasks_leave_the_conditioning_part_clean():
    schedule = MaskSchedule()
    b = 300
    text = torch.randint(0, TEXT_MASK, (b, 10))
    image = torch.randint(0, IMAGE_MASK, (b, 8, 6))
    noised = forward_mask(text, image, schedule, text_mask_id=TEXT_MASK, image_mask_id=IMAGE_MASK,
                          mix=TaskMix(1, 1, 1), generator=torch.Generator().manual_seed(0))
    i2t_given = noised.task == TASKS.index("image_given_text")
    t2i_given = noised.task == TASKS.index("text_given_image")
    assert i2t_given.any() and t2i_given.any() and (noised.task == 0).any()
    assert not noised.text_mask[i2t_given].any() and (noised.t_text[i2t_given] == 0).all()
    assert not noised.image_mask[t2i_given].any() and (noised.t_image[t2i_given] == 0).all()
    assert torch.equal(noised.text_ids[~noised.text_mask], text[~noised.text_mask])
    assert (noised.text_ids[noised.text_mask] == TEXT_MASK).all()


def test_loss_equals_explicit_weighted_cross_entropy():
    """A toy batch written out by hand: L = mean over noised samples of w(t)·Σ_masked CE / L_part."""
    g = torch.Generator().manual_seed(0)
    schedule = MaskSchedule("loglinear")
    # text part: B=3, L=4, V=5; sample 2 is clean (t = 0) and must not count
    logits = torch.randn(3, 4, 5, generator=g)
    targets = torch.randint(0, 5, (3, 4), generator=g)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25, 0.0])
    total = 0.0
    for b in range(2):
        ce = sum(-torch.log_softmax(logits[b, l], dim=-1)[targets[b, l]] for l in range(4) if mask[b, l])
        total += (1.0 / t[b]) * ce / 4
    expected = total / 2
    loss, _ = part_loss(logits, targets, mask, t, schedule)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)

    # image part: B=2, 8 codebooks, N=3 positions, K=6; CE averaged over codes, summed over masked positions
    logits = torch.randn(2, 8, 3, 6, generator=g)
    targets = torch.randint(0, 6, (2, 8, 3), generator=g)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    t = torch.tensor([0.8, 0.4])
    total = 0.0
    for b in range(2):
        ce = 0.0
        for n in range(3):
            if mask[b, n]:
                ce += sum(F.cross_entropy(logits[b, k, n][None], targets[b, k, n][None]) for k in range(8)) / 8
        total += (1.0 / t[b]) * ce / 3
    loss, _ = part_loss(logits, targets, mask, t, schedule)
    assert loss.item() == pytest.approx(float(total / 2), rel=1e-5)


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="unknown mask schedule 'linear'"):
        MaskSchedule("linear")
    with pytest.raises(ValueError, match="must be non-negative"):
        TaskMix(0, 0, 0).probs()


@pytest.mark.parametrize("t", [1e-4, 1e-3, 1e-2, 0.5, 0.999])
def test_cosine_schedule_is_float32_accurate(t):
    """m(t), α(t) and w(t) of the cosine schedule in float32 agree with a float64 `math` evaluation of the
    textbook formulas to 1e-5 relative, also where 1 − cos(πt/2) cancels (small t) and α → 0 (t → 1)."""
    schedule = MaskSchedule("cosine")
    t32 = torch.tensor([t], dtype=torch.float32)
    t64 = t32.double().item()  # the float32 value actually evaluated, so only the formula's error counts
    x = math.pi * t64 / 2
    expected = {"mask_prob": 1 - math.cos(x), "alpha": math.cos(x),
                "weight": (math.pi / 2) * math.sin(x) / (1 - math.cos(x))}
    for name, reference in expected.items():
        value = getattr(schedule, name)(t32)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(reference, rel=1e-5), name


def test_loglinear_schedule_in_float32_is_the_plain_formula():
    # The default schedule keeps its exact float32 arithmetic: m = (1 − ε)·t, α = 1 − m, w = 1/t.
    schedule = MaskSchedule("loglinear", eps=1e-3)
    t = torch.tensor([1e-4, 1e-3, 1e-2, 0.5, 0.999], dtype=torch.float32)
    assert torch.equal(schedule.mask_prob(t), (1.0 - 1e-3) * t)
    assert torch.equal(schedule.alpha(t), 1.0 - (1.0 - 1e-3) * t)
    assert torch.equal(schedule.weight(t), 1.0 / t)
