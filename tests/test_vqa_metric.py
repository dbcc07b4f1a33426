"""The official VQA accuracy (vqaEval.py at its current revision, and the 2017 one as a legacy option):
hand-worked cases for every normalisation rule and for 0..10 matching answers, each derived from the official
code's rules (comments say how), not from this implementation's output."""

from __future__ import annotations

import json

import pytest

from mm_moe.errors import InputError
from mm_moe.eval.vqa_metric import evaluate, vqa_accuracy
from mm_moe.formats.vqa import normalize_answer, process_digit_article, process_punctuation


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


def test_unanimous_answers_normalise_nothing_but_whitespace():
    # all ten identical: neither side gets punctuation or digit/article processing
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # capitals stay
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0  # the period stays
    assert vqa_accuracy("2", ["two"] * 10) == 0.0 and vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 10) == 0.0
    # newlines and tabs become spaces and the ends are stripped, on both sides: then they are unanimous
    assert vqa_accuracy(" yes\n", ["yes\n"] * 5 + ["\tyes"] * 5) == 1.0


def test_disagreeing_answers_normalise_both_sides():
    # number words: "two" -> "2" on both sides; all ten then match
    assert vqa_accuracy("Two", ["two"] * 9 + ["2"]) == 1.0
    # articles dropped on both sides: "a dog", "dog" and "the dog" are one answer
    assert vqa_accuracy("the dog", ["a dog"] * 5 + ["dog"] * 5) == 1.0
    # contractions: "dont know" -> "don't know" (the apostrophe is not in the punctuation list). Three of ten
    # match: leaving out one of them leaves 2 matches (2/3), leaving out another answer leaves 3 (1):
    assert vqa_accuracy("don't know", ["dont know"] * 3 + ["yes"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # commas in numbers: a digit,comma,digit pattern deletes every punctuation mark: "1,000" -> "1000"
    assert vqa_accuracy("1,000", ["1,000"] * 4 + ["1000"] * 2 + ["a thousand"] * 4) == 1.0
    # a period before a digit stays, others go: "3.5." -> "3.5"
    assert vqa_accuracy("3.5.", ["3.5"] * 3 + ["4"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # the 32-period cap: 33 periods lose 32 (".x" stays, no match); 32 periods all go ("x" matches ".x" -> "x")
    humans = [".x"] * 4 + ["y"] * 6
    assert vqa_accuracy("." * 33 + "x", humans) == 0.0
    assert vqa_accuracy("." * 32 + "x", humans) == 1.0
    # "Yes!" among disagreeing answers: '!' replaced by a space (no space next to it), then stripped by split/join
    assert vqa_accuracy("yes", ["Yes!"] * 9 + ["no"]) == 1.0


def test_legacy_2017_revision():
    # the prediction was always normalised; unanimous human answers were left alone
    assert vqa_accuracy("Yes", ["yes"] * 10, legacy=True) == 1.0
    assert vqa_accuracy("the two", ["2"] * 10, legacy=True) == 1.0
    # human answers got punctuation processing only (no digits / articles), and no whitespace cleaning
    # "two" stays "two" on the human side: only the single "2" matches (leaving it out: 0, else 1/3)
    assert vqa_accuracy("2", ["two"] * 9 + ["2"], legacy=True) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("yes", ["yes\n"] * 10, legacy=True) == 0.0
    # "yes!" becomes "yes " (the space the '!' turned into stays): no match
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"], legacy=True) == 0.0


def test_leave_one_out_compares_whole_answer_records():
    # the official code leaves out every record equal to the left-out one: identical records (no answer_id)
    # leave out together. "2": 2 records, "3": 8; prediction "two" -> "2" (the answers disagree).
    same = [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8
    # leaving out a "2" drops both: 0 matches; leaving out a "3" drops all eight: 2 matches -> 2/3
    assert vqa_accuracy("two", same) == pytest.approx((2 * 0 + 8 * 2 / 3) / 10)
    with_ids = [{"answer": a["answer"], "answer_id": i} for i, a in enumerate(same)]
    assert vqa_accuracy("two", with_ids) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_evaluate_files_overall_and_per_type(tmp_path):
    def answers(*texts: str) -> list[dict]:
        return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]

    anns = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "question_type": "is the", "answers": answers(*["yes"] * 10)},
        {"question_id": 2, "answer_type": "number", "question_type": "how many", "answers": answers(*"2233333333")},
        {"question_id": 3, "answer_type": "other", "question_type": "what color", "answers": answers(*["red"] * 10)},
    ]}
    qs = {"questions": [{"question_id": i, "image_id": i, "question": "?"} for i in (1, 2, 3)]}
    (tmp_path / "a.json").write_text(json.dumps(anns))
    (tmp_path / "q.json").write_text(json.dumps(qs))
    res = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}, {"question_id": 3, "answer": "blue"}]
    out = evaluate(res, tmp_path / "a.json", tmp_path / "q.json")
    # question 2: "two" -> "2", 2 of 10 match: leaving out a "2" leaves 1 (1/3), leaving out a "3" leaves 2 (2/3)
    q2 = (2 * 1 / 3 + 8 * 2 / 3) / 10
    assert out["per_answer_type"] == {"number": round(100 * q2, 2), "other": 0.0, "yes/no": 100.0}
    assert out["per_question"] == {1: 100.0, 2: 60.0, 3: 0.0}
    assert out["overall"] == round(100 * (1 + q2 + 0) / 3, 2) == 53.33
    with pytest.raises(InputError, match="1 missing"):
        evaluate(res[:2], tmp_path / "a.json", tmp_path / "q.json")
