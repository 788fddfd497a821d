"""Each training loss against a small independent computation written here (docs/method.md §2)."""
import math

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tokenizer_training.losses import (adaptive_adversarial_weight, bcr_loss, clip_contrastive_loss, hinge_d_loss,
                              hinge_g_loss)
from tokenizer_training.schedule import cosine_lr, linear_warmup


def explicit_clip_loss(img, txt, scale):
    """Cross-entropy over the similarity matrix, written with loops: row i should pick column i
    (image→text) and column j should pick row j (text→image)."""
    n = img.shape[0]
    sim = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i]))) for i in range(n)) / n
    cols = [[sim[i][j] for i in range(n)] for j in range(n)]
    t2i = sum(-(cols[j][j] - math.log(sum(math.exp(s) for s in cols[j]))) for j in range(n)) / n
    return (i2t + t2i) / 2


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_contrastive_loss_equals_explicit_cross_entropy():
    img, txt = unit(6, 16, 0), unit(6, 16, 1)
    scale = torch.tensor(1 / 0.07)
    got = clip_contrastive_loss(img, txt, scale)
    assert float(got) == pytest.approx(explicit_clip_loss(img, txt, float(scale)), rel=1e-5)
    # aligned pairs give a lower loss than shuffled ones
    assert float(clip_contrastive_loss(img, img, scale)) < float(got)


def test_masking_same_targets_leaves_those_pairs_out_of_both_softmaxes():
    """Images 0, 2 and 5 share a caption (one target): with masking, each row's softmax runs over its own
    pair and the pairs with other targets only, written out here per row with math.exp."""
    import math
    img, distinct = unit(6, 8, 0), unit(6, 8, 1)
    txt = distinct.clone()
    txt[2] = txt[5] = txt[0]
    s = 5.0
    logits = (s * img @ txt.t()).tolist()
    same = {0: {2, 5}, 2: {0, 5}, 5: {0, 2}}

    def row_loss(row, i):  # -log softmax at i over the columns that are not i's same-target partners
        kept = [j for j in range(6) if j not in same.get(i, set())]
        return -row[i] + math.log(sum(math.exp(row[j]) for j in kept))
    columns = [list(c) for c in zip(*logits)]
    expected = 0.5 * (sum(row_loss(logits[i], i) for i in range(6)) / 6
                      + sum(row_loss(columns[i], i) for i in range(6)) / 6)
    got = clip_contrastive_loss(img, txt, torch.tensor(s), mask_same_targets=True)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(clip_contrastive_loss(img, txt, torch.tensor(s))) > float(got)  # the paper's: pushed apart
    # with distinct targets, masking changes nothing
    torch.testing.assert_close(clip_contrastive_loss(img, distinct, torch.tensor(s), mask_same_targets=True),
                               clip_contrastive_loss(img, distinct, torch.tensor(s)), rtol=0, atol=0)


def test_hinge_losses_match_their_definitions():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, -0.5, 1.0, 3.0])
    d = sum(max(0.0, 1 - r) for r in real.tolist()) / 4 + sum(max(0.0, 1 + f) for f in fake.tolist()) / 4
    assert float(hinge_d_loss(real, fake)) == pytest.approx(d)
    assert float(hinge_g_loss(fake)) == pytest.approx(-sum(fake.tolist()) / 4)


def test_bcr_is_mean_squared_consistency_for_real_and_fake():
    r, ra, f, fa = (torch.randn(3, 7, generator=torch.Generator().manual_seed(s)) for s in range(4))
    expected = ((ra - r) ** 2).mean() + ((fa - f) ** 2).mean()
    assert float(bcr_loss(r, ra, f, fa)) == pytest.approx(float(expected), rel=1e-6)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    ratio = a.norm() / (b.norm() + 1e-6)
    got = adaptive_adversarial_weight(a, b, base=0.4, warmup=0.5, clamp=(0.0, 1e4))
    assert float(got) == pytest.approx(0.4 * 0.5 * float(ratio), rel=1e-5)
    assert not adaptive_adversarial_weight(a.requires_grad_(), b, base=0.4).requires_grad
    # clamping of the ratio at both ends
    assert float(adaptive_adversarial_weight(a * 1e-9, b, base=0.4, clamp=(0.015, 1e4))) == pytest.approx(0.4 * 0.015)
    assert float(adaptive_adversarial_weight(a * 1e9, b * 1e-9, base=0.4, clamp=(0.015, 1e4))) == pytest.approx(0.4 * 1e4)


def test_schedules():
    assert cosine_lr(0, 100, 5e-4, 5e-5, warmup_steps=10) == pytest.approx(5e-5)
    assert cosine_lr(9, 100, 5e-4, 5e-5, warmup_steps=10) == pytest.approx(5e-4)
    assert cosine_lr(10, 100, 5e-4, 5e-5, warmup_steps=10) == pytest.approx(5e-4)
    assert cosine_lr(55, 100, 5e-4, 5e-5, warmup_steps=10) == pytest.approx((5e-4 + 5e-5) / 2)
    assert cosine_lr(100, 100, 5e-4, 5e-5, warmup_steps=10) == pytest.approx(5e-5)
    assert linear_warmup(0, 10) == 0 and linear_warmup(5, 10) == 0.5 and linear_warmup(50, 10) == 1
    assert linear_warmup(0, 0) == 1


def _gathered_loss_worker(rank, world, init_file, img, txt, scale, out):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n = img.shape[0] // world
    local_img = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    local_txt = txt[rank * n:(rank + 1) * n].clone()
    loss = clip_contrastive_loss(local_img, local_txt, scale)
    loss.backward()
    out[rank] = (loss.detach(), local_img.grad)
    tdist.destroy_process_group()


def test_gathered_contrastive_loss_equals_single_process_loss_on_the_whole_batch(tmp_path):
    img, txt = unit(8, 16, 2), unit(8, 16, 3)
    scale = torch.tensor(10.0)
    whole = img.clone().requires_grad_(True)
    single = clip_contrastive_loss(whole, txt, scale)
    single.backward()

    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gathered_loss_worker, args=(world, str(tmp_path / "rdzv"), img, txt, scale, out), nprocs=world)
    for rank in range(world):
        loss, grad = out[rank]
        assert float(loss) == pytest.approx(float(single.detach()), rel=1e-6)
        # after DDP's gradient averaging (÷ world), each shard gets exactly its single-process gradient
        torch.testing.assert_close(grad / world, whole.grad[rank * 4:(rank + 1) * 4], rtol=1e-5, atol=1e-7)
