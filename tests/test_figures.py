"""Sample grids carry their text on the image: generation.figures.captioned_grid (title strip, caption under each
image, a size fixed by the arguments), the AR sampler's per-label title and the diffusion sampler's prompts."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from generation.figures import LINE_HEIGHT, PAD, captioned_grid, fit_line, grid_size, strip_height, wrap_text

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def has_ink(region: np.ndarray) -> bool:
    """Any clearly dark pixel (text is black on white)."""
    return bool((region.min(axis=-1) < 128).any())


def smooth_images(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="nearest")


def test_layout_size_title_and_captions(tmp_path):
    images = smooth_images(3)
    path = captioned_grid(images, ["axial CT of the thorax", "", "a very long prompt " * 20], "text to image",
                          tmp_path / "sub" / "grid.png", columns=2, min_tile=64, caption_lines=3)
    picture = np.asarray(Image.open(path).convert("RGB"))
    # documented size: width = 2 columns · 16·4 px; height = 20 (title) + 2 rows · (64 + 3·12 + 8)
    assert strip_height(1) == 20 and strip_height(3) == 44 == 3 * LINE_HEIGHT + 2 * PAD
    assert (picture.shape[1], picture.shape[0]) == (128, 20 + 2 * (64 + 44))
    assert (picture.shape[1], picture.shape[0]) == grid_size(3, 16, 16, captions=True, title=True, columns=2)
    assert has_ink(picture[:20])                              # the title strip
    assert has_ink(picture[20 + 64:20 + 108, :64])            # caption under image 0
    assert not has_ink(picture[20 + 64:20 + 108, 64:])        # image 1's caption is empty
    assert has_ink(picture[20 + 108 + 64:, :64])              # caption under image 2 (second row)
    # the images themselves, enlarged 4x by nearest neighbour, exactly where the layout says
    expected = (images * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(picture[20:84:4, 0:64:4], expected[0])
    np.testing.assert_array_equal(picture[20 + 108:20 + 108 + 64:4, 0:64:4], expected[2])


def test_no_title_no_captions_is_a_plain_grid(tmp_path):
    picture = np.asarray(Image.open(captioned_grid(smooth_images(2, size=80), None, None, tmp_path / "g.png")))
    assert picture.shape == (80, 160, 3)  # 80 px tiles are not enlarged; no strips


def test_wrapping_and_truncation():
    measure = len  # 1 px per character
    assert wrap_text("one two three four", 9, 3, measure) == ["one two", "three", "four"]
    lines = wrap_text("one two three four five six seven", 9, 2, measure)
    assert lines[0] == "one two" and lines[1].endswith("...") and len(lines[1]) <= 9
    assert wrap_text("abcdefghijklmnop", 5, 2, measure) == ["abcde", "fg..."]
    assert fit_line("short", 10, measure) == "short" and fit_line("a much longer title", 10, measure) == "a much..."


def test_wrong_inputs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"2 captions for 3 images; give one per image"):
        captioned_grid(smooth_images(3), ["a", "b"], None, tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"got shape \(3, 16, 16\); pass e\.g\. \(pixels \+ 1\) / 2"):
        captioned_grid(smooth_images(3)[:, 0], None, None, tmp_path / "g.png")


def test_ar_grids_carry_the_label_name_above_the_images(tmp_path):
    import meditok
    from generation.ar_model import ARGenerator, get_ar_config
    from generation.sample import run_sampling

    torch.manual_seed(0)
    model = ARGenerator(get_ar_config("tiny", grid=(2, 2), num_labels=2)).eval()
    tokenizer = meditok.build_meditok("tiny").eval()
    labels = torch.tensor([0, 0, 0, 1])
    run_sampling(model, tokenizer, labels, ["ct", "mri"], tmp_path, batch_size=4, progress=False)
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (4, 32, 32, 3)  # the npz keeps the bare images
    picture = np.asarray(Image.open(tmp_path / "grid_ct.png").convert("RGB"))
    # 3 images of 32 px enlarged 2x (min_tile 64) in one row, a 20 px title strip above
    assert (picture.shape[1], picture.shape[0]) == grid_size(3, 32, 32, captions=False, title=True) == (192, 84)
    assert has_ink(picture[:20])
    np.testing.assert_array_equal(picture[20::2, 0:64:2], samples["images"][0])
    np.testing.assert_array_equal(picture[20::2, 128::2], samples["images"][2])
    mri = np.asarray(Image.open(tmp_path / "grid_mri.png").convert("RGB"))
    assert mri.shape == (84, 64, 3) and has_ink(mri[:20])
    assert not np.array_equal(picture[:20, :64], mri[:20, :64])  # different names drawn


@pytest.fixture(scope="module")
def diffusion_checkpoint(tmp_path_factory):
    import csv

    from generation import tokenize_dataset
    from generation.diffusion import train as diffusion_train
    from generation.text import train_caption_tokenizer

    base = tmp_path_factory.mktemp("diffusion_figures")
    cache = base / "cache"
    csv_path, root = "datasets/meta/examples_train.csv", "datasets/examples"
    assert tokenize_dataset.main(["--random-tokenizer", "tiny", "--csv", csv_path, "--root", root, "--out",
                                  str(cache), "--img-size", "32", "--num-workers", "0"]) == 0
    tokenizer = train_caption_tokenizer([r["caption"] for r in csv.DictReader(open(csv_path))], base / "tok",
                                        vocab_size=300)
    assert diffusion_train.main(["--cache", str(cache), "--text-tokenizer", str(tokenizer), "--preset", "tiny",
                                 "--out", str(base / "run"), "--batch-size", "4", "--text-len", "64", "--steps", "1",
                                 "--warmup-steps", "1", "--num-samples", "0"]) == 0
    return base / "run", cache


def test_diffusion_text_to_image_writes_each_prompt_under_its_image(diffusion_checkpoint, tmp_path):
    from generation.diffusion import sample as sample_cli

    checkpoint, cache = diffusion_checkpoint
    out = tmp_path / "gen"
    assert sample_cli.main(["--checkpoint", str(checkpoint), "--task", "text_to_image", "--prompt", "axial ct",
                            "--label", "ct", "--meditok", str(cache / "tokenizer"), "--num", "3", "--batch-size", "3",
                            "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "text_to_image.json").read_text())["prompts"] == ["axial ct"] * 3
    picture = np.asarray(Image.open(out / "text_to_image.png").convert("RGB"))
    # 3 images of 32 px enlarged to 128 px (min_tile 128), a title strip above, 3 caption lines below
    size = grid_size(3, 32, 32, captions=True, title=True, columns=8, min_tile=128)
    assert (picture.shape[1], picture.shape[0]) == size == (384, 20 + 128 + 44)
    assert has_ink(picture[:20])
    for column in range(3):
        assert has_ink(picture[20 + 128:, column * 128:(column + 1) * 128]), column
