"""--stage 3: both contrastive terms in one stage (the ablation of docs/method.md §4), against the loss written
out here, and its checkpoint (two heads) through save, resume and the report-agreement loader."""
import json
import math

import torch
import torch.nn.functional as F

import train
from tokenizer_training.args import Args
from tokenizer_training.trainer import Trainer


def _info_nce(scale, a, b):
    logits = scale * a @ b.t()
    labels = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def test_combined_stage_has_both_terms_with_their_weights_and_gradients(tiny_networks):
    args = Args(stage=3, preset="tiny", img_size=32, device="cpu", precision="fp32", lpips_weight=0, adv_weight=0,
                batch_size=3, biomedclip=tiny_networks["biomedclip"], dino=tiny_networks["dino"])
    assert (args.vision_contrast, args.text_contrast) == (0.1, 1.0)  # each stage's own weight
    torch.manual_seed(0)
    tr = Trainer(args, torch.device("cpu"))
    assert [(t.name, t.weight) for t in tr.loss_terms] == [
        ("rec_l1", 0.2), ("rec_l2", 1.0), ("vq", 1.0), ("contrast_vision", 0.1), ("contrast_text", 1.0)]
    assert tr.text_tokenizer is not None  # the data will carry captions
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text = torch.stack([tr.text_tokenizer(c) for c in ("ct of the head", "mri of the brain", "h&e stain")])
    batch = {"image": images, "text": text}
    params = {n: p for n, p in tr.model.named_parameters() if p.requires_grad}
    logs = tr.backward(batch, 1.0, disc_active=False, disc_warm=0.0)
    ours = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None

    # reference: L = 0.2·L1 + L2 + VQ + 0.1·InfoNCE(z, f_vision(E_vision(x))) + 1.0·InfoNCE(z, f_text(E_text(t)))
    with torch.no_grad():
        vision_features = tr.alignment("vision").teacher(images).float()
        text_features = tr.alignment("text").teacher(text).float()
    out = tr.tokenizer(images)
    head_v, head_t = tr.model.heads["vision"], tr.model.heads["text"]
    contrast_v = _info_nce(out["logit_scale"], out["image_features"], head_v(vision_features))
    contrast_t = _info_nce(out["logit_scale"], out["image_features"], head_t(text_features))
    rec = out["reconstruction"]
    loss = (0.2 * (rec - images).abs().mean() + ((rec - images) ** 2).mean() + out["vq_loss"]
            + 0.1 * contrast_v + 1.0 * contrast_t)
    loss.backward()
    torch.testing.assert_close(logs["loss/contrast_vision"], contrast_v.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["loss/contrast_text"], contrast_t.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["loss/total"], loss.detach(), rtol=1e-5, atol=1e-7)
    assert set(ours) == {n for n, p in params.items() if p.grad is not None}
    for name, p in params.items():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    # both heads learn (neither term is silently dropped)
    assert ours["heads.vision.proj.weight"].abs().sum() > 0 and ours["heads.text.proj.weight"].abs().sum() > 0


def test_combined_stage_resumes_exactly_and_its_text_head_loads(train_argv, tmp_path, deterministic, capsys):
    """3 steps straight == 2 steps, stop, --resume auto, 1 more: both heads (and their optimiser state) are
    restored; the run's text head is what the report-agreement loader reads; a one-head run refuses it."""
    from evaluation.report_metrics import load_text_head
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(stage=3, max_steps=3, adv_weight=0, lpips_weight=0, deterministic="true")
    assert train.main(train_argv(straight, **common)) == 0
    assert train.main(train_argv(resumed, stop_at_step=2, **common)) == 0
    ckpt = torch.load(resumed / "ckpt-00000002.pth", map_location="cpu", weights_only=False)
    assert set(ckpt["heads"]) == {"vision", "text"} and "proj.weight" in ckpt["heads"]["text"]
    assert train.main(train_argv(resumed, resume="auto", **common)) == 0
    a, b = (torch.load(run / "ckpt-00000003.pth", map_location="cpu", weights_only=False)
            for run in (straight, resumed))
    for name in ("vision", "text"):
        for key in a["heads"][name]:
            torch.testing.assert_close(a["heads"][name][key], b["heads"][name][key], rtol=0, atol=1e-6)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss/contrast_vision"] > 0 and r["loss/contrast_text"] > 0 and math.isfinite(r["loss/total"])
               for r in records)
    head = load_text_head(resumed)  # a run folder: its newest checkpoint
    torch.testing.assert_close(head.proj.weight, b["heads"]["text"]["proj.weight"])
    assert train.main(train_argv(resumed, resume=str(resumed / "ckpt-00000002.pth"), output_dir=str(tmp_path / "s2"),
                                 **{**common, "stage": 2})) == 1  # a stage-2 run over stage-3 heads
    assert "resume it with the --stage" in capsys.readouterr().err


def test_same_caption_pairs_can_be_left_out_of_the_contrastive_loss(tiny_networks):
    """--contrast-same-targets masked reaches the trainer's loss: two images of one caption are not negatives."""
    from tokenizer_training.losses import clip_contrastive_loss
    values = {}
    for mode in ("negative", "masked"):
        args = Args(stage=2, preset="tiny", img_size=32, device="cpu", precision="fp32", lpips_weight=0,
                    adv_weight=0, biomedclip=tiny_networks["biomedclip"], contrast_same_targets=mode)
        torch.manual_seed(0)
        tr = Trainer(args, torch.device("cpu"))
        images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        text = torch.stack([tr.text_tokenizer(c) for c in ("ct of the head", "h&e stain", "ct of the head")])
        logs = tr.backward({"image": images, "text": text}, 1.0, disc_active=False, disc_warm=0.0)
        with torch.no_grad():
            out = tr.model(images, {"text": tr.alignment("text").teacher(text).float()})
            reference = clip_contrastive_loss(out["image_features"], out["target_features/text"], out["logit_scale"],
                                              mask_same_targets=mode == "masked")
        torch.testing.assert_close(logs["loss/contrast"], reference, rtol=1e-5, atol=1e-7)
        values[mode] = float(logs["loss/contrast"])
    assert values["masked"] < values["negative"]
