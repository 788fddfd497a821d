"""Readers of question/caption files (interpretation/data.py) on small files in each release format."""
import json
from pathlib import Path

import pytest

from interpretation.data import DataFormatError, detect_format, read_records


def write_json(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_llava_med_json(tmp_path):
    path = write_json(tmp_path / "instruct.json", [
        {"id": "a", "image": "img/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A chest X-ray."},
            {"from": "human", "value": "Any effusion?"}, {"from": "gpt", "value": "No."}]},
    ])
    assert detect_format(path) == "llava"
    (record,) = read_records(path, image_root=tmp_path / "root")
    assert record.image == tmp_path / "root" / "img/1.jpg"
    assert record.turns == [("<image>\nWhat is shown?", "A chest X-ray."), ("Any effusion?", "No.")]
    (caption,) = read_records(path, captions=True)
    assert caption.turns == [("<image>\n", "A chest X-ray.")]  # stage A keeps the first answer as the caption
    assert caption.image == tmp_path / "img/1.jpg"              # default root: the file's folder


def test_llava_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": f"A{i}"}]}) for i in range(3)) + "\n")
    assert [r.answer for r in read_records(path)] == ["A0", "A1", "A2"]


def test_pubmedvision_skips_multi_image_records(tmp_path, capsys):
    path = write_json(tmp_path / "PubMedVision_Alignment_VQA.json", [
        {"id": "1", "image": ["images/a.jpg"], "modality": "CT", "body_part": "Chest", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Axial CT."}]},
        {"id": "2", "image": ["images/b.jpg", "images/c.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Two views."}]},
    ])
    assert detect_format(path) == "pubmedvision"
    records = read_records(path, captions=True)
    assert [r.id for r in records] == ["1"] and records[0].image == tmp_path / "images/a.jpg"
    assert "skipped 1 record(s) with several images" in capsys.readouterr().out


def test_csv_captions_and_questions(tmp_path):
    captions = tmp_path / "meta.csv"
    captions.write_text("identifier,caption,modality\nct/a.png,Axial CT.,ct\n")
    (record,) = read_records(captions, captions=True)
    assert record.turns == [("<image>\n", "Axial CT.")] and record.modality == "ct"
    qa = tmp_path / "qa.csv"
    qa.write_text("image,question,answer,answer_type,split\na.png,Is it CT?,yes,CLOSED,test\nb.png,Organ?,liver,,train\n")
    records = read_records(qa)
    assert [(r.question, r.answer, r.answer_type) for r in records] == [("Is it CT?", "yes", "closed"),
                                                                        ("Organ?", "liver", None)]
    assert [r.id for r in read_records(qa, split="test")] == ["2"]  # id defaults to the CSV line
    # the file has no image placeholder: the prompt gets one in front of the question
    assert records[0].prompt_turns() == [("<image>\nIs it CT?", "yes")]


def test_vqa_rad_release_format(tmp_path):
    root = tmp_path / "VQA_RAD"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    path = write_json(root / "VQA_RAD Dataset Public.json", [
        {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "Yes", "answer_type": "CLOSED",
         "question_type": "PRES", "question": "Is there a mass?", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "left temporal lobe",
         "answer_type": "OPEN", "question_type": "POS", "question": "Where is the mass?", "phrase_type": "test_freeform"},
        {"qid": 3, "image_name": "synpic2.jpg", "image_organ": "CHEST", "answer": "No", "answer_type": "CLOSED",
         "question_type": "PRES", "question": "Is it normal?", "phrase_type": "test_para"},
    ])
    assert detect_format(path) == "vqa-rad"
    test = read_records(path, split="test")
    assert [r.id for r in test] == ["2", "3"]
    assert test[0].image == root / "VQA_RAD Image Folder" / "synpic1.jpg"
    assert (test[0].answer_type, test[0].question_type) == ("open", "POS")
    assert [r.id for r in read_records(path, split="train")] == ["1"]


def test_slake_release_format_english_subset(tmp_path):
    root = tmp_path / "Slake1.0"
    (root / "imgs").mkdir(parents=True)
    items = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
         "q_lang": "en", "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
         "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 10},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "哪个器官异常?", "answer": "肝脏", "q_lang": "zh",
         "location": "Abdomen", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa", "content_type": "Organ",
         "triple": ["vhead", "_", "_"], "qid": 11},
    ]
    path = write_json(root / "validate.json", items)
    assert detect_format(path) == "slake"
    (record,) = read_records(path)
    assert record.id == "10" and record.split == "val" and record.question_type == "Organ"
    assert record.image == root / "imgs" / "xmlab1/source.jpg"


def test_unknown_format_names_file_and_fix(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"picture": "a.png", "q": "?", "a": "!"}])
    with pytest.raises(DataFormatError, match=r"odd\.json: unknown question-file format.*--data-format"):
        read_records(path)
    txt = tmp_path / "odd.txt"
    txt.write_text("hello")
    with pytest.raises(DataFormatError, match=r"odd\.txt: unknown question-file format"):
        read_records(txt)


@pytest.mark.parametrize("name, content, match", [
    ("a.json", [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]}],
     r"a\.json:record 0: the answer is missing"),
    ("VQA_RAD Dataset Public.json", [{"qid": 7, "image_name": "x.jpg", "question": "Q", "answer": "",
                                      "answer_type": "OPEN", "phrase_type": "test_freeform"}],
     r"record 0 \(qid 7\): the answer is missing"),
])
def test_missing_answers_name_the_record(tmp_path, name, content, match):
    with pytest.raises(DataFormatError, match=match):
        read_records(write_json(tmp_path / name, content))


def test_csv_missing_answer_and_columns(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("image,question,answer\na.png,Q1,yes\nb.png,Q2,\n")
    with pytest.raises(DataFormatError, match=r"qa\.csv:line 3: the answer is missing; fill in the 'answer' cell"):
        read_records(path)
    path.write_text("image,question\na.png,Q1\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['answer'\]"):
        read_records(path)
