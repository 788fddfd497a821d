"""VQA answer scoring (evaluation/vqa.py) against hand-worked examples."""
import pytest

from evaluation.vqa import (answer_type_of, breakdown, closed_contains, closed_exact, normalize_answer, open_recall,
                            score)


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("  YES. ", "yes"),
    ("The Left Lung!", "left lung"),
    ("an MRI, T2-weighted", "mri t2 weighted"),
    ("right_kidney", "right kidney"),
    ("", ""),
])
def test_normalisation_of_case_punctuation_and_articles(text, expected):
    assert normalize_answer(text) == expected


def test_closed_yes_no():
    assert closed_exact("Yes.", "yes") == 1.0
    assert closed_exact("no", "Yes") == 0.0
    # exact match does not forgive extra words; LLaVA-Med's containment rule does
    assert closed_exact("Yes, there is.", "yes") == 0.0
    assert closed_contains("Yes, there is.", "yes") == 1.0
    # containment is on words, so 'no' is not found inside 'not' or 'normal'
    assert closed_contains("it is not normal", "no") == 0.0
    assert closed_contains("no, it is normal", "no") == 1.0


def test_open_free_text_recall_hand_worked():
    # reference words: [left, lung, upper, lobe]; the answer has left, lung, lobe → 3/4
    assert open_recall("A lesion in the left lung lobe", "the left lung, upper lobe") == pytest.approx(0.75)
    # each reference word is matched at most as often as it occurs in the answer: [lung, lung] vs one 'lung' → 1/2
    assert open_recall("lung", "lung lung") == pytest.approx(0.5)
    assert open_recall("Liver.", "liver") == 1.0
    assert open_recall("spleen", "liver") == 0.0


def test_score_picks_the_convention_by_answer_type():
    closed = score("Yes, it is", "yes", "closed")
    assert closed["score"] == 0.0 and closed["closed_contains"] == 1.0 and closed["open_recall"] is None
    opened = score("Left lung", "the left lung", "open")
    assert opened["score"] == 1.0 and opened["open_exact"] == 1.0 and opened["closed"] is None


def test_answer_type_falls_back_to_yes_no_references():
    assert answer_type_of("Yes", None) == "closed"
    assert answer_type_of("left lung", None) == "open"
    assert answer_type_of("yes", "open") == "open"  # the file's label wins


def test_breakdown_hand_worked():
    rows = [
        {"benchmark": "B", "answer_type": "closed", "question_type": "PRES", **score("yes", "yes", "closed")},
        {"benchmark": "B", "answer_type": "closed", "question_type": "PRES", **score("yes", "no", "closed")},
        {"benchmark": "B", "answer_type": "open", "question_type": "ORGAN", **score("left lung", "lung", "open")},
        {"benchmark": "B", "answer_type": "open", "question_type": "ORGAN", **score("heart", "left kidney", "open")},
    ]
    groups = {g["group"]: g for g in breakdown(rows)}
    overall = groups["all"]
    assert overall["questions"] == 4 and overall["closed_questions"] == 2
    assert overall["closed"] == pytest.approx(50.0)            # 1 of 2 closed
    assert overall["open_recall"] == pytest.approx(50.0)       # (1 + 0) / 2
    assert overall["open_exact"] == pytest.approx(0.0)
    assert overall["score"] == pytest.approx(100 * (1 + 0 + 1 + 0) / 4)
    assert groups["question_type=ORGAN"]["questions"] == 2
    assert groups["answer_type=closed"]["open_recall"] is None
