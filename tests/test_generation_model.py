"""The AR generator: causality over positions and codebooks, KV-cache sampling, CFG, bad inputs."""
import pytest
import torch

from generation.ar_model import AR_PRESETS, ARGenerator, generator_payload, get_ar_config, load_generator
from generation.conditioning import LabelEmbedding, guided_logits
from generation.sample import generate
from generation.sampling import choose, filter_logits

V = 32            # a small codebook keeps the tests fast; the layout is the real one (8 codebooks × h·w)
GRID = (3, 3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(head="sequential", seed=0, **overrides):
    torch.manual_seed(seed)
    config = get_ar_config("tiny", grid=GRID, codebook_size=V, num_labels=3, head=head, **overrides)
    return ARGenerator(config).eval()


def random_ids(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, 8, GRID[0] * GRID[1]), generator=g)


@pytest.mark.parametrize("head", ["sequential", "independent"])
def test_logits_do_not_see_later_positions_or_later_codes(head):
    model = tiny(head)
    ids, labels = random_ids(2), torch.tensor([0, 2])
    with torch.no_grad():
        base = model(ids, labels)
        L = ids.shape[-1]
        for t in (0, 4, L - 1):
            for k in (0, 3, 7):
                changed = ids.clone()
                changed[:, :, t + 1:] = (changed[:, :, t + 1:] + 1 + torch.arange(L - t - 1)) % V   # later positions
                changed[:, k:, t] = (changed[:, k:, t] + 5) % V                                       # codes >= k at t
                after = model(changed, labels)
                torch.testing.assert_close(after[:, t, k], base[:, t, k], rtol=0, atol=1e-7)
        # The check can fail: an earlier code of the same position does move code 7's logits (sequential
        # head), and an earlier position moves everything after it.
        earlier = ids.clone()
        earlier[:, :, 1] = (earlier[:, :, 1] + 7) % V
        assert (model(earlier, labels)[:, 2] - base[:, 2]).abs().max() > 1e-5
        if head == "sequential":
            same_position = ids.clone()
            same_position[:, 0, 4] = (same_position[:, 0, 4] + 7) % V
            assert (model(same_position, labels)[:, 4, 1:] - base[:, 4, 1:]).abs().max() > 1e-5


@pytest.mark.parametrize("head", ["sequential", "independent"])
def test_kv_cache_sampling_gives_the_ids_of_full_recomputation(head):
    model = tiny(head, seed=3)
    labels = torch.tensor([0, 1, 2, 3])  # 3 = the null label (unconditional)
    for options in ({}, {"temperature": 0.7, "top_k": 10, "top_p": 0.9}, {"cfg_scale": 2.5}):
        cached = generate(model, labels, generator=torch.Generator().manual_seed(5), use_cache=True, **options)
        full = generate(model, labels, generator=torch.Generator().manual_seed(5), use_cache=False, **options)
        assert torch.equal(cached, full), options
    other_seed = generate(model, labels, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other_seed, cached)


def test_greedy_sampling_agrees_with_the_training_forward():
    """Independent check of the sampling path: greedy ids are the argmax of the teacher-forced logits."""
    model = tiny("sequential", seed=4)
    labels = torch.tensor([1, 2])
    ids = generate(model, labels, temperature=0)
    with torch.no_grad():
        logits = model(ids, labels)                     # [B, L, K, V]
    assert torch.equal(logits.argmax(-1), ids.permute(0, 2, 1))


def test_cfg_scale_one_equals_no_guidance_and_zero_equals_unconditional():
    model = tiny("sequential", seed=1)
    labels = torch.tensor([0, 2, 1])
    plain = generate(model, labels, generator=torch.Generator().manual_seed(2))
    scale_one = generate(model, labels, generator=torch.Generator().manual_seed(2), cfg_scale=1.0)
    assert torch.equal(plain, scale_one)
    unconditional = generate(model, torch.full_like(labels, 3), generator=torch.Generator().manual_seed(2))
    scale_zero = generate(model, labels, generator=torch.Generator().manual_seed(2), cfg_scale=0.0)
    assert torch.equal(unconditional, scale_zero)
    c, u = torch.randn(4, V), torch.randn(4, V)
    torch.testing.assert_close(guided_logits(c, u, 3.0), u + 3.0 * (c - u))


def test_choose_inverts_the_filtered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    probs = filter_logits(logits, top_k=2).softmax(-1)
    assert probs[0, :2].sum() == 0
    # nucleus 0.5: only the top token (mass 0.64) survives
    assert filter_logits(logits, top_p=0.5).isfinite().sum() == 1
    cdf = logits.softmax(-1).cumsum(-1)[0]
    for u in (0.0, 0.05, 0.2, 0.5, 0.99):
        expected = int((cdf < u).sum())
        assert choose(logits, torch.tensor([u])).item() == expected


def test_class_dropout_uses_the_null_label():
    embedding = LabelEmbedding(4, 8, dropout_prob=0.5)
    labels = torch.arange(4).repeat(50)
    dropped = embedding.drop_labels(labels, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) <= {0, 1, 2, 3, 4}
    kept = dropped == labels
    assert 0.35 < (~kept).float().mean() < 0.65 and (dropped[~kept] == 4).all()


def test_bad_inputs_give_clear_errors(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="CFG scale must be >= 0"):
        generate(model, torch.tensor([0]), cfg_scale=-1.0)
    with pytest.raises(ValueError, match=r"label value\(s\) \[7\]"):
        generate(model, torch.tensor([7]))
    with pytest.raises(ValueError, match=r"expected ids \[B, 8, 9\]"):
        model(torch.zeros(1, 8, 16, dtype=torch.long), torch.tensor([0]))
    path = tmp_path / "generator.pth"
    torch.save(generator_payload(model, label_names=["a", "b", "c"]), path)
    with pytest.raises(ValueError, match=r"'tiny' generator, not 'B'"):
        load_generator(path, preset="B")
    loaded, info = load_generator(path, preset="tiny")
    assert info["label_names"] == ["a", "b", "c"]
    ids = random_ids(1)
    torch.testing.assert_close(loaded(ids, torch.tensor([1])), model(ids, torch.tensor([1])))


def test_presets_build_with_the_paper_sizes():
    assert AR_PRESETS["B"]["depth"] == 12 and AR_PRESETS["B"]["heads"] == 12 and AR_PRESETS["B"]["width"] == 768
    for name in AR_PRESETS:
        with torch.device("meta"):
            model = ARGenerator(get_ar_config(name, grid=(16, 16), num_labels=6))
        assert model.num_parameters() > 0 and model.L == 256


def test_sampling_benchmark_runs_in_tiny_mode(tmp_path):
    """CI smoke test of benchmarks/synthesis_benchmark.py (the GPU command is the same without --tiny)."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "synthesis_benchmark.py"
    out = tmp_path / "bench.json"
    argv = sys.argv
    sys.argv = [str(script), "--tiny", "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exited.value.code == 0
    result = json.loads(out.read_text())
    assert [s["batch"] for s in result["sampling"]] == [2, 4] and result["sampling"][0]["images_per_s"] > 0
    assert result["training"]["flops_per_image_fwd_bwd"] > 0


def test_samples_npz_is_never_left_half_written(tmp_path, monkeypatch):
    import numpy as np

    from generation import sample

    def crash_midway(handle, **arrays):
        handle.write(b"PK partial zip")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sample.save_npz_atomically(tmp_path / "samples.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_sampling_refuses_a_tokenizer_other_than_the_caches(tmp_path):
    import meditok
    from generation.sample import load_decoder
    from generation.token_cache import tokenizer_fingerprint

    torch.manual_seed(0)
    right = meditok.build_meditok("tiny")
    torch.manual_seed(1)
    meditok.save_meditok(meditok.build_meditok("tiny"), tmp_path / "other")
    info = {"token_cache": {"tokenizer_fingerprint": tokenizer_fingerprint(right), "tokenizer_source": "runs/x"}}
    with pytest.raises(ValueError) as error:
        load_decoder(info, str(tmp_path / "other"), False, torch.device("cpu"), "generator.pth")
    assert tokenizer_fingerprint(right)[:16] in str(error.value) and "--tokenizer" in str(error.value)
    assert load_decoder(info, str(tmp_path / "other"), True, torch.device("cpu"), "generator.pth") is not None
