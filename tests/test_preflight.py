"""tokenizer_training.preflight: every missing teacher/loss network of a run reported at once, before anything is built."""
import shutil
from types import SimpleNamespace

import pytest

from tokenizer_training.preflight import check_networks, missing_networks


def _args(**overrides):
    values = dict(vision_contrast=0.1, text_contrast=0.0, lpips_weight=1.0, adv_weight=0.4, biomedclip="",
                  text_teacher_source="", lpips_vgg="", dino="")
    values.update(overrides)
    return SimpleNamespace(**values)


def test_all_missing_networks_in_one_message(tmp_path):
    args = _args(biomedclip=str(tmp_path / "no_biomedclip"), lpips_vgg=str(tmp_path / "no_vgg16.pth"),
                 dino=str(tmp_path / "no_dino"))
    with pytest.raises(SystemExit) as caught:
        check_networks(args)
    message = str(caught.value.code)
    assert message.startswith("3 pretrained networks")
    for expected in ("no_biomedclip", "no_vgg16.pth", "no_dino", "--contrast-weight", "--lpips-weight",
                     "--adv-weight", "external/README.md"):
        assert expected in message, expected
    # one numbered line per network, in a fixed order
    numbered = [line for line in message.splitlines() if line.lstrip()[:2] in ("1.", "2.", "3.")]
    assert [line.split("(")[0].strip() for line in numbered] == [
        "1. BiomedCLIP image teacher", "2. LPIPS VGG16", "3. DINOv2 discriminator"]


def test_default_locations_follow_the_environment(tmp_path, monkeypatch):
    """With no paths given, the defaults (here under MEDITOK_EXTERNAL) are the places named."""
    monkeypatch.setenv("MEDITOK_EXTERNAL", str(tmp_path / "ext"))
    for name in ("MEDITOK_BIOMEDCLIP", "MEDITOK_LPIPS_VGG", "MEDITOK_DINO"):
        monkeypatch.delenv(name, raising=False)
    problems = missing_networks(_args())
    assert len(problems) == 3
    assert str(tmp_path / "ext" / "biomedclip") in problems[0]
    assert str(tmp_path / "ext" / "vgg16.pth") in problems[1]
    assert str(tmp_path / "ext" / "dinov2_vits14") in problems[2]


def test_only_networks_with_a_positive_weight_are_required(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    assert missing_networks(_args(vision_contrast=0, lpips_weight=0, adv_weight=0, biomedclip=nowhere, lpips_vgg=nowhere,
                                  dino=nowhere)) == []
    only_dino = missing_networks(_args(vision_contrast=0, lpips_weight=0, biomedclip=nowhere, lpips_vgg=nowhere, dino=nowhere))
    assert len(only_dino) == 1 and only_dino[0].startswith("DINOv2 discriminator")
    with pytest.raises(SystemExit, match=r"^1 pretrained network this run needs is missing"):
        check_networks(_args(vision_contrast=0, lpips_weight=0, dino=nowhere))


def test_present_networks_pass_and_an_incomplete_folder_is_named(tiny_networks, tmp_path):
    ok = _args(biomedclip=tiny_networks["biomedclip"], dino=tiny_networks["dino"], lpips_vgg="random")
    assert check_networks(ok) is None
    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(b"x")  # presence is what is checked up front; the contents are checked when loaded
    assert missing_networks(_args(biomedclip=tiny_networks["biomedclip"], dino=tiny_networks["dino"],
                                  lpips_vgg=str(vgg))) == []
    # a BiomedCLIP folder without the text tower's config.json: the loader's own message names that file
    broken = tmp_path / "biomedclip"
    shutil.copytree(tiny_networks["biomedclip"], broken)
    (broken / "config.json").unlink()
    problems = missing_networks(_args(biomedclip=str(broken), dino=tiny_networks["dino"], lpips_vgg="random"))
    assert len(problems) == 1 and str(broken / "config.json") in problems[0]


def test_hub_ids_are_not_checked_offline():
    assert missing_networks(_args(biomedclip="hf-hub:x/y", dino="hf-hub:x/z", lpips_vgg="random")) == []


def test_the_text_teacher_is_checked_where_it_is_read(tmp_path, tiny_networks):
    """Stage 2/3 read the text tower from --text-teacher (default: --biomedclip); a missing one is named once,
    and a folder shared by both teachers is not reported twice."""
    from tokenizer_training.args import Args
    nowhere = str(tmp_path / "no_text_teacher")
    stage3 = Args(stage=3, biomedclip=tiny_networks["biomedclip"], text_teacher=nowhere, lpips_vgg="random",
                  dino=tiny_networks["dino"])
    problems = missing_networks(stage3)
    assert len(problems) == 1 and problems[0].startswith("text teacher") and "no_text_teacher" in problems[0]
    assert missing_networks(Args(stage=1, biomedclip=tiny_networks["biomedclip"], text_teacher=nowhere,
                                 lpips_vgg="random", dino=tiny_networks["dino"])) == []  # stage 1 reads no text
    shared = Args(stage=3, biomedclip=nowhere, lpips_vgg="random", dino=tiny_networks["dino"])
    assert [p.split(" (")[0] for p in missing_networks(shared)] == ["BiomedCLIP image teacher"]
