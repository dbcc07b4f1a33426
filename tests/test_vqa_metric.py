"""The official VQA accuracy: hand-worked cases for every normalisation rule and for 0..10 matching answers."""

from __future__ import annotations

import json

import pytest

from mm_moe.eval.vqa_metric import evaluate, normalize_answer, process_digit_article, process_punctuation, vqa_accuracy


def test_punctuation_next_to_a_space_is_deleted_else_replaced_by_a_space():
    assert process_punctuation("yes !") == "yes "  # '!' touches a space: deleted
    assert process_punctuation("black-and-white") == "black and white"  # no space next to '-': replaced
    # the check looks at the original text for every symbol: one spaced ';' makes every ';' vanish
    assert process_punctuation("a;b ; c") == "ab  c"


def test_comma_between_digits_deletes_all_punctuation():
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("1,000 (approx)") == "1000 approx"  # '(' and ')' deleted too: digit,digit seen
    assert process_punctuation("red,blue") == "red blue"


def test_period_removal_and_its_32_limit():
    assert process_punctuation("3.5") == "3.5"  # followed by a digit: kept
    assert process_punctuation("dr. who.") == "dr who"
    assert process_punctuation("." * 33 + "x") == ".x"  # re.UNICODE (32) passed as count


def test_digits_articles_and_contractions():
    assert process_digit_article("Two Dogs") == "2 dogs"
    assert process_digit_article("none of the cats") == "0 of cats"
    assert process_digit_article("a an the") == ""
    assert process_digit_article("dont isnt") == "don't isn't"
    assert process_digit_article("Im") == "im"  # capitalised keys in the table never match after lower()
    assert normalize_answer(" Yes.\n") == "yes"


@pytest.mark.parametrize("n,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (10, 1.0)])
def test_accuracy_for_n_matching_answers(n, expected):
    """Mean over the 10 leave-one-out subsets of min(1, matches / 3): n matches -> min(1, 0.3 n)."""
    gts = ["cat"] * n + [f"dog{i}" for i in range(10 - n)]
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_ground_truth_processing_quirks():
    # all ten identical: no processing of the answers, so "Yes!" never equals the normalised prediction "yes"
    assert vqa_accuracy("yes", ["Yes!"] * 10) == 0.0
    # not all identical: punctuation only; "yes!" becomes "yes " (trailing space stays) and still does not match
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0
    # a prediction gets digits/articles processing, the ground truth does not
    assert vqa_accuracy("the two", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0


def test_evaluate_files_overall_and_per_type(tmp_path):
    anns = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "question_type": "is the", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8},
        {"question_id": 3, "answer_type": "other", "question_type": "what color",
         "answers": [{"answer": "red"}] * 10},
    ]}
    qs = {"questions": [{"question_id": i, "image_id": i, "question": "?"} for i in (1, 2, 3)]}
    (tmp_path / "a.json").write_text(json.dumps(anns))
    (tmp_path / "q.json").write_text(json.dumps(qs))
    res = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}, {"question_id": 3, "answer": "blue"}]
    out = evaluate(res, tmp_path / "a.json", tmp_path / "q.json")
    assert out["per_answer_type"] == {"number": 60.0, "other": 0.0, "yes/no": 100.0}
    assert out["overall"] == round(100 * (1 + 0.6 + 0) / 3, 2) == 53.33
    with pytest.raises(ValueError, match="1 missing"):
        evaluate(res[:2], tmp_path / "a.json", tmp_path / "q.json")
