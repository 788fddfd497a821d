"""The generator protocol and registry (generation/generators.py): every registered kind builds, saves, loads back
through the registry with equal weights, trains (finite loss that backpropagates) and samples ids of the right shape
and range, reproducibly; the adapters equal the code they wrap; a checkpoint of no kind is refused naming the kinds;
and evaluation.synthesis samples and evaluates either kind from its checkpoint.

A new kind: add its tiny config to ``tiny_config`` below; every parametrised test then covers it."""
import csv
import json

import numpy as np
import pytest
import torch

from generation.generators import (GENERATORS, Generator, UnknownGeneratorError, generator_for,
                                   generator_for_checkpoint, sample_ids)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CSV, ROOT = "datasets/meta/examples_train.csv", "datasets/examples"
V = 32            # a small codebook keeps the tests fast
GRID = (2, 2)
LABELS = ["ct", "mri"]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    """A caption tokenizer (the diffusion model's text side needs one on disk to load)."""
    from generation.text import train_caption_tokenizer

    captions = [row["caption"] for row in csv.DictReader(open(CSV))]
    return train_caption_tokenizer(captions, tmp_path_factory.mktemp("text") / "tokenizer", vocab_size=300)


def tiny_config(name, text_tokenizer, grid=GRID, codebook_size=V, labels=LABELS):
    kind = generator_for(name)
    if name == "ar":
        return kind.make_config("tiny", grid=grid, codebook_size=codebook_size, num_labels=len(labels))
    if name == "diffusion":
        from generation.text import TextCodec, load_text_tokenizer

        vocab = TextCodec(load_text_tokenizer(text_tokenizer), 8).vocab_size
        return kind.make_config("tiny", text_vocab_size=vocab, text_tokenizer=str(text_tokenizer), text_len=8,
                                codebook_size=codebook_size, grid=grid, condition_names=list(labels))
    raise AssertionError(f"add a tiny config of the generator kind {name!r} to this test")


def tiny_model(name, text_tokenizer, seed=0, **config):
    torch.manual_seed(seed)
    kind = generator_for(name)
    model = kind.build(tiny_config(name, text_tokenizer, **config))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random non-zero weights (the diffusion model's AdaLN gates start at 0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def batch_for(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    positions = cfg.grid[0] * cfg.grid[1]
    batch = {"ids": torch.randint(0, cfg.codebook_size, (b, cfg.num_codebooks, positions), generator=g),
             "labels": torch.arange(b) % len(LABELS)}
    if hasattr(cfg, "text_len"):
        batch["text_ids"] = torch.randint(0, cfg.text_vocab_size, (b, cfg.text_len), generator=g)
    return batch


KINDS = sorted(GENERATORS)


def test_the_registry_holds_ar_and_diffusion_under_one_protocol():
    assert {"ar", "diffusion"} <= set(GENERATORS)
    for name, kind in GENERATORS.items():
        assert isinstance(kind, Generator) and kind.name == name and kind.formats
    from generation.ar_model import ARConfig
    from generation.diffusion.model import DiffusionConfig

    assert generator_for("ar").config_class is ARConfig
    assert generator_for("diffusion").config_class is DiffusionConfig
    with pytest.raises(UnknownGeneratorError, match="known kinds: ar .*diffusion"):
        generator_for("gan")


@pytest.mark.parametrize("name", KINDS)
def test_save_then_load_through_the_registry_gives_equal_weights(name, text_tokenizer, tmp_path):
    kind = generator_for(name)
    model = tiny_model(name, text_tokenizer)
    path = kind.save(model, tmp_path / "ckpt.pt")
    assert kind.detect(path) and all(not other.detect(path) for other in GENERATORS.values() if other is not kind)
    assert generator_for_checkpoint(path) is kind
    loaded, info = generator_for_checkpoint(path).load(path, "cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert info["kind"] == name and len(info["label_names"]) == len(LABELS) and "token_cache" in info
    assert loaded.config.to_dict() == model.config.to_dict()
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys()
    for key in state:
        assert torch.equal(state[key], back[key]), key


@pytest.mark.parametrize("name", KINDS)
def test_loss_is_finite_and_backpropagates(name, text_tokenizer):
    kind = generator_for(name)
    model = tiny_model(name, text_tokenizer).train()
    torch.manual_seed(0)
    loss, logs = kind.loss(model, batch_for(model))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", KINDS)
def test_sample_gives_ids_in_the_codebook_reproducibly(name, text_tokenizer):
    kind = generator_for(name)
    model = tiny_model(name, text_tokenizer, seed=2)
    labels = torch.tensor([0, 1, len(LABELS)])   # the last one: the null label (unconditional)
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=None)
    ids = kind.sample(model, labels, seed=7, **settings)
    assert ids.shape == (3, 8, GRID[0] * GRID[1]) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < V
    assert torch.equal(kind.sample(model, labels, seed=7, **settings), ids)
    assert torch.equal(kind.sample(model, labels, generator=torch.Generator().manual_seed(7), **settings), ids)
    assert not torch.equal(kind.sample(model, labels, seed=8, **settings), ids)
    guided = kind.sample(model, labels[:2], seed=7, temperature=0.8, top_k=5, top_p=0.9, cfg_scale=2.0)
    assert guided.shape == (2, 8, 4) and int(guided.max()) < V
    with pytest.raises(ValueError, match="label"):
        kind.sample(model, torch.tensor([len(LABELS) + 1]), seed=0)
    # batched through one generator (what evaluation.synthesis does) = the same draws in one call
    batched, seconds = sample_ids(kind, model, labels, batch_size=3, seed=7, **settings)
    assert torch.equal(batched, ids) and seconds >= 0


def test_ar_sample_is_generation_sample_generate():
    """The protocol's ``ar`` sample against calling the AR sampler directly with the same settings."""
    from generation.ar_model import ARGenerator, get_ar_config
    from generation.sample import generate

    torch.manual_seed(4)
    model = ARGenerator(get_ar_config("tiny", grid=GRID, codebook_size=V, num_labels=2)).eval()
    labels = torch.tensor([0, 1, 2, 1])
    for settings in ({}, {"temperature": 0.7, "top_k": 10, "top_p": 0.9}, {"cfg_scale": 2.5}):
        expected = generate(model, labels, generator=torch.Generator().manual_seed(11), **settings)
        assert torch.equal(generator_for("ar").sample(model, labels, seed=11, **settings), expected), settings


def test_diffusion_sample_is_the_joint_task_of_the_sampler(text_tokenizer):
    """The protocol's ``diffusion`` sample = the image part of the sampler's label-only (joint) task."""
    from generation.diffusion.sampler import SamplerOptions, sample

    model = tiny_model("diffusion", text_tokenizer, seed=5)
    labels = torch.tensor([1, 0, 2])
    for settings in ({}, {"temperature": 0.7, "top_k": 10, "cfg_scale": 2.0}):
        options = SamplerOptions(**{"cfg_scale": None, **settings})
        _, expected = sample(model, task="joint", labels=labels, options=options,
                             generator=torch.Generator().manual_seed(3))
        ids = generator_for("diffusion").sample(model, labels, seed=3, **settings)
        assert torch.equal(ids, expected), settings


def test_a_checkpoint_of_no_kind_is_refused_naming_the_known_kinds(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"format": "someone-elses-gan-v3", "model": {}}, other)
    with pytest.raises(UnknownGeneratorError, match="someone-elses-gan-v3.*known kinds: ar .*diffusion"):
        generator_for_checkpoint(other)
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(UnknownGeneratorError, match="known kinds: ar"):
        generator_for_checkpoint(weights)
    with pytest.raises(FileNotFoundError):
        generator_for_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="is a folder.*--kind diffusion"):
        generator_for_checkpoint(tmp_path)


def test_the_diffusion_kind_loads_a_run_folder(text_tokenizer, tmp_path):
    """A diffusion run folder (its trainer's ckpt-*.pth files): the newest checkpoint, as --kind diffusion reads it."""
    kind = generator_for("diffusion")
    old, new = tiny_model("diffusion", text_tokenizer, seed=1), tiny_model("diffusion", text_tokenizer, seed=2)
    kind.save(old, tmp_path / "run" / "ckpt-00000001.pth", step=1)
    kind.save(new, tmp_path / "run" / "ckpt-00000002.pth", step=2)
    loaded, _ = kind.load(tmp_path / "run")
    for key, value in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------------
# evaluation.synthesis over either kind (set-up as tests/test_generation_metrics.py, on a real tiny token cache)

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A 32-px token cache of the bundled examples (random tiny tokenizer, 2×2 grid), as tests/test_diffusion_train.py."""
    from generation import tokenize_dataset
    from generation.token_cache import TokenCache

    out = tmp_path_factory.mktemp("registry") / "cache"
    assert tokenize_dataset.main(["--random-tokenizer", "tiny", "--csv", CSV, "--root", ROOT, "--out", str(out),
                                  "--img-size", "32", "--num-workers", "0"]) == 0
    return TokenCache(out)


def cache_checkpoint(name, cache, text_tokenizer, path):
    """A tiny model of kind ``name`` over the cache's ids, saved as its trainer would (labels, tokenizer)."""
    labels = list(cache.label_names)
    model = tiny_model(name, text_tokenizer, seed=1, grid=tuple(cache.grid), codebook_size=cache.codebook_size,
                       labels=labels)
    kind = generator_for(name)
    if name == "ar":
        extra = {"label_names": labels, "token_cache": {"path": str(cache.path), "tokenizer_fingerprint": cache.fingerprint,
                                                        "tokenizer_source": cache.manifest.get("tokenizer_source")}}
    else:  # the diffusion trainer keeps its arguments (--cache, --meditok) and the cache's fingerprint
        extra = {"tokenizer_fingerprint": cache.fingerprint, "args": {"cache": str(cache.path), "meditok": None}}
    return kind.save(model, path, **extra), labels


def synthesis_argv(ckpt, out, *extra):
    return ["--generator", str(ckpt), "--per-label", "2", "--labels", "ct", "fundus", "--real-csv", CSV,
            "--real-root", ROOT, "--random-inception", "--batch-size", "3", "--device", "cpu", "--out", str(out),
            "--quiet", *extra]


@pytest.mark.parametrize("name", KINDS)
def test_synthesis_evaluates_a_generator_checkpoint_of_either_kind(name, cache, text_tokenizer, tmp_path):
    from evaluation import synthesis

    ckpt, labels = cache_checkpoint(name, cache, text_tokenizer, tmp_path / f"{name}.pt")
    assert {"ct", "fundus"} <= set(labels)
    assert synthesis.main(synthesis_argv(ckpt, tmp_path / "out")) == 0
    payload = json.loads((tmp_path / "out" / "synthesis.json").read_text())
    assert payload["generated"]["sampling"]["kind"] == name
    assert payload["generator"] == generator_for(name).description
    assert [r["modality"] for r in payload["per_modality"]] == ["ct", "fundus"]
    assert all(r["generated"] == 2 for r in payload["per_modality"])
    assert any("RANDOMLY INITIALISED INCEPTION" in w for w in payload["warnings"])
    samples = np.load(tmp_path / "out" / "samples" / "samples.npz")
    assert samples["images"].shape == (4, 32, 32, 3) and samples["ids"].shape == (4, 8, 4)
    assert (tmp_path / "out" / "samples" / "grid_ct.png").is_file()
    # --kind named explicitly gives the same samples
    assert synthesis.main(synthesis_argv(ckpt, tmp_path / "named", "--kind", name)) == 0
    again = np.load(tmp_path / "named" / "samples" / "samples.npz")
    assert np.array_equal(again["ids"], samples["ids"])
    # the ids are those of one seeded generator over the batches, through the protocol
    kind = generator_for(name)
    model, info = kind.load(ckpt, "cpu")
    index = torch.tensor([info["label_names"].index(n) for n in ("ct", "fundus") for _ in range(2)])
    expected, _ = sample_ids(kind, model, index, batch_size=3, seed=0, temperature=1.0, cfg_scale=None)
    assert np.array_equal(samples["ids"], expected.numpy().astype(np.uint16))


def test_synthesis_from_an_ar_checkpoint_keeps_the_ids_of_generation_sample(cache, text_tokenizer, tmp_path):
    """Before the registry, evaluation.synthesis sampled through generation.sample.run_sampling: same ids now."""
    from evaluation import synthesis
    from generation.ar_model import load_generator
    from generation.sample import load_decoder, run_sampling

    ckpt, _ = cache_checkpoint("ar", cache, text_tokenizer, tmp_path / "ar.pt")
    assert synthesis.main(synthesis_argv(ckpt, tmp_path / "out", "--no-fid")) == 0
    model, info = load_generator(ckpt)
    labels = torch.tensor([info["label_names"].index(n) for n in ("ct", "fundus") for _ in range(2)])
    tokenizer = load_decoder(info, None, False, torch.device("cpu"), str(ckpt))
    run_sampling(model, tokenizer, labels, info["label_names"], tmp_path / "reference", batch_size=3, seed=0,
                 progress=False)
    reference = np.load(tmp_path / "reference" / "samples.npz")
    ours = np.load(tmp_path / "out" / "samples" / "samples.npz")
    for key in ("ids", "images", "labels", "label_names"):
        assert np.array_equal(ours[key], reference[key]), key


def test_synthesis_errors_are_one_line_with_exit_status_2(cache, text_tokenizer, tmp_path, capsys):
    from evaluation import synthesis

    other = tmp_path / "other.pth"
    torch.save({"format": "someone-elses-gan-v3"}, other)
    assert synthesis.main(synthesis_argv(other, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "known kinds: ar" in err and "diffusion" in err
    ckpt, _ = cache_checkpoint("ar", cache, text_tokenizer, tmp_path / "ar.pt")
    assert synthesis.main(synthesis_argv(ckpt, tmp_path / "out", "--kind", "diffusion")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meditok-joint-diffusion-v1" in err
    assert synthesis.main(["--samples", str(tmp_path / "none.npz"), "--real-csv", CSV, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "samples file not found" in err
    assert synthesis.main(synthesis_argv(ckpt, tmp_path / "out", "--labels", "xray")) == 2
    assert "unknown to the generator" in capsys.readouterr().err
    missing = tmp_path / "no_inception.pth"
    argv = [a for a in synthesis_argv(ckpt, tmp_path / "out") if a != "--random-inception"]
    assert synthesis.main(argv + ["--inception-weights", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-fid" in err
