"""Iterative unmasking: no mask left, conditioning kept, CFG arithmetic, confidence ordering."""
import pytest
import torch

from generation.diffusion.model import JointDiffusionTransformer, get_config
from generation.diffusion.sampler import SamplerOptions, combine_guidance, guided_logits, sample, unmask_step

V, K = 40, 32


@pytest.fixture(scope="module")
def model():
    cfg = get_config("tiny", text_vocab_size=V, codebook_size=K, grid=(3, 3), text_len=8,
                     condition_names=["ct", "mri"], condition_dropout=0.0)
    torch.manual_seed(0)
    m = JointDiffusionTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # random non-zero gates: the test should see a model that mixes positions
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def given(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return (torch.randint(0, V, (b, cfg.text_len), generator=g),
            torch.randint(0, K, (b, cfg.num_codebooks, cfg.num_positions), generator=g),
            torch.tensor([0, 1, 2])[:b])


@pytest.mark.parametrize("method", ["confidence", "ancestral"])
@pytest.mark.parametrize("task", ["text_to_image", "image_to_text", "joint"])
def test_no_mask_left_and_conditioning_kept(model, method, task):
    text, image, labels = given(model)
    out_text, out_image = sample(model, task=task, labels=labels, text_ids=text, image_ids=image,
                                 options=SamplerOptions(steps=4, method=method, cfg_scale=2.0),
                                 generator=torch.Generator().manual_seed(0))
    assert not (out_text == V).any() and not (out_image == K).any()
    assert out_text.shape == text.shape and out_image.shape == image.shape
    assert out_text.max() < V and out_image.max() < K
    if task == "text_to_image":
        assert torch.equal(out_text, text)
    if task == "image_to_text":
        assert torch.equal(out_image, image)


def test_more_steps_than_positions(model):
    text, image, labels = given(model)
    _, out_image = sample(model, task="text_to_image", labels=labels, text_ids=text,
                          options=SamplerOptions(steps=20), generator=torch.Generator().manual_seed(0))
    assert not (out_image == K).any()


def test_cfg_scale_one_equals_no_guidance(model):
    text, image, labels = given(model)
    t = torch.full((3,), 0.7)
    masked_image = torch.full_like(image, K)
    cond = model(text, masked_image, torch.zeros(3), t, labels)
    guided = guided_logits(model, text, masked_image, torch.zeros(3), t, labels, 1.0, "text")
    assert torch.equal(guided[1], cond[1]) and torch.equal(guided[0], cond[0])
    # the formula itself, at scale 1, with a real unconditional branch, is the conditional logits
    uncond = model(torch.full_like(text, V), masked_image, torch.ones(3), t, torch.full_like(labels, model.null_label))
    assert torch.allclose(combine_guidance(cond[1], uncond[1], 1.0), cond[1], atol=1e-6)
    # and scale 3 follows u + 3(c − u), differing from c
    g3 = guided_logits(model, text, masked_image, torch.zeros(3), t, labels, 3.0, "text")
    assert torch.allclose(g3[1], uncond[1] + 3.0 * (cond[1] - uncond[1]), atol=1e-5)
    assert not torch.allclose(g3[1], cond[1], atol=1e-3)


def test_unmask_step_reveals_the_most_confident_masked_positions():
    mask = torch.tensor([[True, True, False, True, True]])
    confidence = torch.tensor([[0.1, 0.9, 5.0, 0.5, 0.2]])  # position 2 is not masked: never chosen
    reveal = unmask_step(mask, confidence, keep_masked=torch.tensor([2]))
    assert reveal.tolist() == [[False, True, False, True, False]]


def test_bad_options():
    with pytest.raises(ValueError, match="unknown sampling method 'greedy'"):
        SamplerOptions(method="greedy")
    with pytest.raises(ValueError, match="steps=0"):
        SamplerOptions(steps=0)


def test_benchmark_writes_json(tmp_path):
    """benchmarks/diffusion_benchmark.py in its smallest setting (a subprocess: nothing imports a script)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/diffusion_benchmark.py", "--img-size", "32", "--text-len", "8",
                    "--text-vocab-size", "50", "--batch", "2", "--sample-batch", "2", "--sample-steps", "2", "3",
                    "--iters", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)], check=True)
    result = json.loads(out.read_text())
    assert result["grid"] == [2, 2] and set(result["sampling"]) == {"2", "3"}
    for tasks in result["sampling"].values():
        assert tasks["text_to_image"]["images_per_s"] > 0 and tasks["image_to_text"]["text_tokens_per_s"] > 0
    assert result["train"]["samples_per_s"] > 0
