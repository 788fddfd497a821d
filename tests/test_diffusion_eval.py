"""Report metrics against hand-computed references, the agreement judge, and the evaluation CLI end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.report_metrics import AgreementJudge, load_text_head, report_metrics, words


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_report_metrics_match_hand_computed_values():
    refs = ["the heart is normal in size", "no focal consolidation"]
    hyps = ["the heart is large", "no focal consolidation"]
    out = report_metrics(refs, hyps)
    # corpus BLEU-1: clipped unigram matches / hypothesis words, times the brevity penalty
    matches, hyp_len, ref_len = 3 + 3, 4 + 3, 6 + 3
    assert out["bleu1"] == pytest.approx(matches / hyp_len * math.exp(1 - ref_len / hyp_len), rel=1e-6)
    # ROUGE-L F1 from the longest common subsequence, averaged over reports
    f1 = []
    for r, h in zip(refs, hyps):
        r, h = words(r), words(h)
        k = lcs(r, h)
        p, rec = k / len(h), k / len(r)
        f1.append(2 * p * rec / (p + rec))
    assert out["rougeL"] == pytest.approx(sum(f1) / 2, rel=1e-6)
    # METEOR of an identical 3-word report: F_mean = 1, one chunk of 3 matches → penalty 0.5·(1/3)³
    assert out["meteor_wordnet"] in (True, False)
    identical = report_metrics(["no focal consolidation"], ["no focal consolidation"])
    assert identical["meteor"] == pytest.approx(1 - 0.5 * (1 / 3) ** 3, rel=1e-6)
    with pytest.raises(ValueError, match="as many references as hypotheses"):
        report_metrics(["a"], [])


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory):
    """A stage-2-shaped training checkpoint: tiny random MedITok + f_text head, and a tiny BiomedCLIP folder."""
    import meditok
    from local_openclip.tiny import make_tiny_biomedclip

    base = tmp_path_factory.mktemp("stage2")
    clip = make_tiny_biomedclip(base / "biomedclip", seed=0)
    torch.manual_seed(0)
    model = meditok.build_meditok("tiny", img_size=32)
    from local_openclip import load_text_teacher
    teacher = load_text_teacher(str(clip))
    head = {"norm.weight": torch.ones(teacher.output_dim), "norm.bias": torch.zeros(teacher.output_dim),
            "proj.weight": torch.randn(model.config.embed_dim, teacher.output_dim) * 0.1,
            "proj.bias": torch.zeros(model.config.embed_dim)}
    path = base / "last.pth"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "heads": head}, path)
    return path, clip, model, teacher, head


def test_agreement_is_cosine_of_the_two_alignment_embeddings(stage2_checkpoint):
    path, clip, model, teacher, head = stage2_checkpoint
    judge = AgreementJudge(model.eval(), teacher, load_text_head(path))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reports = ["axial ct of the chest", "fundus photograph"]
    image_emb = F.normalize(model.encode_image(images), dim=-1)
    text = teacher(teacher.tokenize(reports))
    text = F.layer_norm(text, (text.shape[-1],), head["norm.weight"], head["norm.bias"], eps=1e-6)
    text_emb = F.normalize(text @ head["proj.weight"].T + head["proj.bias"], dim=-1)
    expected = (image_emb * text_emb).sum(-1)
    assert torch.allclose(judge.scores(images, reports), expected, atol=1e-5)


def test_agreement_needs_a_stage2_head(tmp_path):
    torch.save({"model": {}}, tmp_path / "stage1.pth")
    with pytest.raises(ValueError, match="holds no stage-2 text head"):
        load_text_head(tmp_path / "stage1.pth")


def test_evaluation_cli_end_to_end(tmp_path, stage2_checkpoint):
    from evaluation import diffusion as evaluation_diffusion
    from generation import tokenize_dataset
    from generation.diffusion import train as diffusion_train
    from generation.text import train_caption_tokenizer
    import csv

    csv_path, root = "datasets/meta/examples_train.csv", "datasets/examples"
    cache = tmp_path / "cache"
    assert tokenize_dataset.main(["--random-tokenizer", "tiny", "--csv", csv_path, "--root", root, "--out", str(cache),
                                  "--img-size", "32", "--num-workers", "0"]) == 0
    tok = train_caption_tokenizer([r["caption"] for r in csv.DictReader(open(csv_path))], tmp_path / "tok", 300)
    assert diffusion_train.main(["--cache", str(cache), "--text-tokenizer", str(tok), "--out", str(tmp_path / "run"),
                                 "--steps", "1", "--batch-size", "2", "--text-len", "64", "--num-samples", "0"]) == 0
    path, clip, *_ = stage2_checkpoint
    out = tmp_path / "eval"
    assert evaluation_diffusion.main(["--checkpoint", str(tmp_path / "run"), "--cache", str(cache),  # the run folder
                                      "--out", str(out), "--num-samples", "4", "--batch-size", "4", "--steps", "2",
                                      "--random-inception", "--align-checkpoint", str(path), "--biomedclip", str(clip),
                                      "--device", "cpu"]) == 0
    result = json.loads((out / "diffusion_eval.json").read_text())
    assert result["checkpoint"].endswith("ckpt-00000001.pth")  # the file the run folder resolved to
    assert set(result["tasks"]) == {"text_to_image", "image_to_text", "joint"}
    for key in ("bleu1", "bleu4", "rougeL", "meteor"):
        assert 0 <= result["tasks"]["image_to_text"]["report"][key] <= 1
    assert result["tasks"]["text_to_image"]["image"]["images_per_modality"]
    assert -1 <= result["agreement"]["real_pairs"] <= 1 and "joint" in result["agreement"]
    assert result["speed"]["text_to_image"]["images_per_s"] > 0
    assert (out / "diffusion_eval.md").is_file() and (out / "diffusion_eval_reports.csv").is_file()
    assert (out / "samples_text_to_image.png").is_file()
