"""MedITok as a language model's vision tower: placeholder expansion, label masking, projector, generation."""
import pytest
import torch

from interpretation.model import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, MedITokLlava, ProjectorMismatchError, PromptError,
                                  with_placeholder)
from interpretation.tiny import make_tiny_lm
from interpretation.vision_tower import MedITokVisionTower

IMG = 32  # tiny MedITok at 32 px: a 2 × 2 grid → 4 image features


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {"chat": make_tiny_lm(root / "chat", seed=0), "plain": make_tiny_lm(root / "plain", seed=0, chat_template=None),
            "wide": make_tiny_lm(root / "wide", seed=0, hidden_size=32, num_heads=2)}


def build(lm_dir, template="auto", projector="mlp2x_gelu", features="quantized"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tower = MedITokVisionTower.from_source("random:tiny", features, img_size=IMG)
    return MedITokLlava(tower, AutoModelForCausalLM.from_pretrained(str(lm_dir)),
                        AutoTokenizer.from_pretrained(str(lm_dir)), projector, template).eval()


def images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=(IMG, IMG), mode="bilinear")


def test_vision_tower_features_follow_the_quantised_path():
    tower = MedITokVisionTower.from_source("random:tiny", img_size=IMG)
    x = images()
    feats = tower(x)
    assert feats.shape == (2, tower.num_tokens, tower.tokenizer.config.vit_width) and tower.num_tokens == 4
    # reference through the public token API: ids → codewords → output projection
    with torch.no_grad():
        ids = tower.tokenizer.img_to_idx(x)
        reference = tower.tokenizer.post_quant_proj(tower.tokenizer.quantizer.idx_to_f(ids))
    torch.testing.assert_close(feats, reference)
    continuous = MedITokVisionTower(tower.tokenizer, "continuous", img_size=IMG)(x)
    assert continuous.shape == feats.shape and not torch.allclose(continuous, feats)
    assert MedITokVisionTower(tower.tokenizer, "encoder", img_size=IMG)(x).shape == feats.shape
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.tokenizer.training  # frozen: stays in eval mode


@pytest.mark.parametrize("template, answer_text", [("chat", " CT scan</s>"), ("plain", " CT scan</s>")])
def test_placeholder_expands_to_image_features_and_labels_keep_only_the_answer(lm_dirs, template, answer_text):
    model = build(lm_dirs[template], template)
    tok = model.tokenizer
    row = model.encode_prompt([("<image>\nWhat modality?", "CT scan")], source="t")
    ids, labels = row["input_ids"], row["labels"]
    positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    assert len(positions) == model.vision_tower.num_tokens
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous block
    supervised = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    # the supervised tokens are the last ones and spell exactly the answer and the end-of-sequence token
    assert supervised == list(range(len(ids) - len(supervised), len(ids)))
    assert [ids[i] for i in supervised] == [labels[i] for i in supervised]
    assert tok.decode([ids[i] for i in supervised]) == answer_text
    assert supervised[-1] == len(ids) - 1 and ids[-1] == tok.eos_token_id
    # the text before the answer is the template's prompt with the placeholder where the image goes
    prompt = "<s>[INST] <image>\nWhat modality? [/INST]" if template == "chat" else "<s>USER: <image>\nWhat modality? ASSISTANT:"
    before, after = prompt.split("<image>")
    expected = (tok(before, add_special_tokens=False)["input_ids"] + [IMAGE_TOKEN_INDEX] * len(positions)
                + tok(after, add_special_tokens=False)["input_ids"])
    assert ids[:len(expected)] == expected and len(expected) == supervised[0]


def test_embed_puts_projected_features_at_the_image_positions(lm_dirs):
    model = build(lm_dirs["chat"])
    rows = [model.encode_prompt([(with_placeholder(q), a)]) for q, a in (("Is it CT?", "yes"), ("Organ?", "the liver"))]
    from interpretation.model import pad_batch

    batch = pad_batch(rows, model.tokenizer.pad_token_id)
    x = images()
    with torch.no_grad():
        feats = model.projector(model.vision_tower(x))
        embeds = model.embed(batch["input_ids"], model.image_features(x))
        table = model.language_model.get_input_embeddings().weight
    for b in range(2):
        img = (batch["input_ids"][b] == IMAGE_TOKEN_INDEX).nonzero().flatten()
        torch.testing.assert_close(embeds[b, img], feats[b])
        text = (batch["input_ids"][b] != IMAGE_TOKEN_INDEX).nonzero().flatten()
        torch.testing.assert_close(embeds[b, text], table[batch["input_ids"][b, text]])


def test_generation_with_image_equals_generation_from_inputs_embeds(lm_dirs):
    model = build(lm_dirs["chat"])
    tok, lm = model.tokenizer, model.language_model
    x = images(2)
    questions = ["What imaging modality is this?", "Is there a lesion?"]
    answers = model.generate(x, questions, max_new_tokens=6)
    for b, question in enumerate(questions):
        # built by hand: the template's text around the placeholder, embedded, with the projected features between
        before, after = f"<s>[INST] <image>\n{question} [/INST]".split("<image>")
        table = lm.get_input_embeddings()
        with torch.no_grad():
            parts = [table(torch.tensor(tok(before, add_special_tokens=False)["input_ids"])),
                     model.projector(model.vision_tower(x[b:b + 1]))[0],
                     table(torch.tensor(tok(after, add_special_tokens=False)["input_ids"]))]
            embeds = torch.cat(parts)[None]
            out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            # and an independent greedy loop without the KV cache
            ids = []
            for _ in range(6):
                step = torch.cat([embeds, table(torch.tensor([ids], dtype=torch.long))], dim=1) if ids else embeds
                nxt = int(lm(inputs_embeds=step).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
        assert answers[b] == tok.decode(out[0], skip_special_tokens=True).strip()
        assert answers[b] == tok.decode(ids, skip_special_tokens=True).strip()
    # a left-padded batch answers as each question alone
    assert model.generate(x[1:], questions[1:], max_new_tokens=6) == answers[1:]


@pytest.mark.parametrize("question, match", [
    ("What is shown?", "has no image placeholder"),
    ("<image> and <image>: compare", "has 2 image placeholder"),
])
def test_image_placeholder_missing_or_repeated_is_an_error(lm_dirs, question, match):
    model = build(lm_dirs["chat"])
    with pytest.raises(PromptError, match=rf"qa\.json:record 3: the prompt {match}.*exactly once"):
        model.encode_prompt([(question, "yes")], source="qa.json:record 3")


def test_projector_checkpoint_round_trip_and_hidden_size_mismatch(lm_dirs, tmp_path):
    model = build(lm_dirs["chat"], projector="linear")
    path = model.save_projector(tmp_path / "projector.safetensors")
    other = build(lm_dirs["chat"], projector="linear")
    other.load_projector(tmp_path)  # a run folder holding projector.safetensors
    for a, b in zip(model.projector.state_dict().values(), other.projector.state_dict().values()):
        assert torch.equal(a, b)
    wide = build(lm_dirs["wide"], projector="linear")
    with pytest.raises(ProjectorMismatchError, match=r"projector\.safetensors: .*language-model hidden size 64, this "
                                                     r"model has 32.*--language-model"):
        wide.load_projector(path)
    with pytest.raises(ProjectorMismatchError, match=r"projector type linear.*--projector linear"):
        build(lm_dirs["chat"], projector="mlp2x_gelu").load_projector(path)


def test_vision_tower_loads_any_meditok_source(tmp_path):
    import meditok

    torch.manual_seed(3)
    tokenizer = meditok.build_meditok("tiny").eval()
    meditok.save_meditok(tokenizer, tmp_path / "tok")            # a saved folder, as the quick start writes
    meditok.save_meditok(tokenizer, tmp_path / "tok.safetensors")
    x = images()
    expected = MedITokVisionTower(tokenizer, img_size=IMG)(x)
    for source in (tmp_path / "tok", tmp_path / "tok.safetensors"):
        torch.testing.assert_close(MedITokVisionTower.from_source(str(source), img_size=IMG)(x), expected)
    with pytest.raises(ValueError, match="multiple of 16"):
        MedITokVisionTower(tokenizer, img_size=40)
