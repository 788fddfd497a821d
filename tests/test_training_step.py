"""The training step's gradients against the textbook computation written here: every loss evaluated on the
reconstruction itself, the adaptive weight from two extra autograd passes through LPIPS and DINO, one
backward of the summed loss, and four separate discriminator passes. The trainer differentiates the loss
networks once each and batches the discriminator's passes; the gradients must not change."""
import torch
import torch.nn.functional as F
import pytest

from tokenizer_training.args import Args
from tokenizer_training.diffaug import diff_augment
from tokenizer_training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    from local_openclip.tiny import make_tiny_biomedclip
    from tokenizer_training.discriminator import make_tiny_dino
    out = tmp_path_factory.mktemp("tiny")
    return {"biomedclip": str(make_tiny_biomedclip(out / "biomedclip")), "dino": str(make_tiny_dino(out / "dino"))}


def textbook_backward(tr: Trainer, images: torch.Tensor, warm: float) -> dict:
    """Reference: VQGAN-style step as usually written (losses on x̂, autograd.grad twice, one backward)."""
    a = tr.args
    out = tr.model(images, {"vision": tr.alignment("vision").teacher(images).float()})
    rec = out["reconstruction"]
    nll = 0.2 * (rec - images).abs().mean() + ((rec - images) ** 2).mean() + tr.lpips(rec, images).mean()
    logits_t = out["logit_scale"] * out["image_features"] @ out["target_features/vision"].t()
    labels = torch.arange(images.shape[0])
    contrast = 0.5 * (F.cross_entropy(logits_t, labels) + F.cross_entropy(logits_t.t(), labels))
    tr.disc.heads.requires_grad_(False)
    tr.disc.eval()
    g_adv = -tr.disc(diff_augment(rec, cutout=a.diffaug_cutout)).mean()
    tr.disc.train()
    tr.disc.heads.requires_grad_(True)
    last = tr.tokenizer.decoder.up_conv4.conv2.weight
    g_nll_w = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_adv_w = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
    weight = 0.4 * warm * (g_nll_w.norm() / (g_adv_w.norm() + 1e-6)).clamp(0.015, 1e4)
    (nll + out["vq_loss"] + a.contrast * contrast + weight.detach() * g_adv).backward()
    # discriminator: four separate passes
    fake = rec.detach()
    fit_r, fit_f = tr.disc.draw_fit(*images.shape[-2:]), tr.disc.draw_fit(*images.shape[-2:])
    r = tr.disc(diff_augment(images, cutout=a.diffaug_cutout), fit=fit_r)
    f = tr.disc(diff_augment(fake, cutout=a.diffaug_cutout), fit=fit_f)
    ra = tr.disc(diff_augment(images, cutout=a.bcr_cutout), fit=fit_r)
    fa = tr.disc(diff_augment(fake, cutout=a.bcr_cutout), fit=fit_f)
    d = F.relu(1 - r).mean() + F.relu(1 + f).mean()
    bcr = ((ra - r) ** 2).mean() + ((fa - f) ** 2).mean()
    (d + 4 * bcr).backward()
    return {"adv_weight": weight, "loss/disc": d, "loss/bcr": bcr, "loss/g_adv": g_adv}


def test_single_backward_step_has_the_textbook_gradients(tiny_sources):
    args = Args(stage=1, preset="tiny", img_size=32, device="cpu", precision="fp32", lpips_vgg="random",
                batch_size=3, **tiny_sources)
    torch.manual_seed(0)
    tr = Trainer(args, torch.device("cpu"))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    warm = 0.7
    params = {**{f"tok.{n}": p for n, p in tr.model.named_parameters() if p.requires_grad},
              **{f"disc.{n}": p for n, p in tr.disc.heads.named_parameters()}}

    torch.manual_seed(5)  # same augmentation and crop draws in both runs
    logs = tr.backward({"image": images}, 1.0, disc_active=True, disc_warm=warm)
    ours = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    torch.manual_seed(5)
    ref = textbook_backward(tr, images, warm)

    assert set(n for n, p in params.items() if p.grad is not None) == set(ours)
    for name, p in params.items():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    for key, value in ref.items():
        torch.testing.assert_close(logs[key], value.detach(), rtol=1e-5, atol=1e-7, msg=key)
    assert float(logs["adv_weight"]) > 0 and float(logs["loss/bcr"]) > 0
    # the decoder's last layer does get the adversarial term (λ·∇L_adv is not just added to the log)
    assert ours["tok.tokenizer.decoder.up_conv4.conv2.weight"].abs().sum() > 0


def test_batched_discriminator_call_equals_separate_calls(tiny_sources):
    from tokenizer_training.discriminator import build_discriminator
    torch.manual_seed(0)
    disc = build_discriminator(tiny_sources["dino"])
    xs = [torch.rand(2, 3, 30, 33, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    fits = [disc.draw_fit(30, 33, fit="crop"), disc.draw_fit(30, 33, fit="resize"), disc.draw_fit(30, 33, fit="crop")]
    together = disc(xs, fit=fits)
    assert len(together) == 3
    for x, f, got in zip(xs, fits, together):
        torch.testing.assert_close(got, disc(x, fit=f), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one fit per batch"):
        disc(xs, fit=fits[:2])


@pytest.mark.parametrize("speed", [{"channels_last": True}, {"compile": True, "compile_backend": "aot_eager"}],
                         ids=["channels_last", "compile"])
def test_speed_options_keep_the_gradients(tiny_sources, speed):
    """--channels_last and --compile (traced by torch.compile, kernels left to aot_eager so that CI stays fast)
    give the plain step's losses and gradients, and leave the tokenizer's parameter names alone."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    results = []
    for options in ({}, speed):
        args = Args(stage=1, preset="tiny", img_size=32, device="cpu", precision="fp32", lpips_vgg="random",
                    batch_size=2, **tiny_sources, **options)
        torch.manual_seed(0)
        tr = Trainer(args, torch.device("cpu"))
        torch.manual_seed(5)
        logs = tr.backward({"image": images}, 1.0, disc_active=True, disc_warm=1.0)
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        results.append((logs, grads, list(tr.tokenizer.state_dict())))
    (logs0, grads0, names0), (logs1, grads1, names1) = results
    if speed.get("compile"):  # really compiled (a silent eager fallback would make this test vacuous)
        assert counters["stats"]["unique_graphs"] >= graphs_before + 2
    assert names1 == names0 and set(grads1) == set(grads0)
    for key in ("loss/rec_l1", "loss/lpips", "loss/g_adv", "loss/contrast", "adv_weight", "loss/disc"):
        torch.testing.assert_close(logs1[key], logs0[key], rtol=1e-4, atol=1e-6, msg=key)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-3, atol=1e-6, msg=name)
