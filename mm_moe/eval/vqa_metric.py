"""The official VQA v2 accuracy: GT-Vision-Lab/VQA vqaEval.py at its current revision (a013f00, 2021-03-11,
"Fixed processing answers bug"), its answer normalisation reproduced exactly.

Per question: newlines and tabs become spaces and both ends are stripped, on the human answers and on the
prediction. Only if the human answers are then not all identical, processPunctuation and processDigitArticle
are applied to every human answer and to the prediction; if they are all identical nothing else is normalised
on either side (a prediction "Yes" scores 0 against ten "yes"). Quirks kept on purpose, because leaderboard
numbers depend on them:
- punctuation is deleted when it touches a space (or the text has a digit,comma,digit pattern), else
  replaced by a space; the check looks at the *original* text for every symbol;
- every '.' not followed by a digit is removed, but at most 32 times (vqaEval passes re.UNICODE, = 32, as count);
- contraction keys with capitals ("Im", "Ive", ...) never match, since words are lower-cased first;
- leave-one-out drops every answer *record* equal to the left-out one (dict comparison): records that differ
  only by answer_id (all real ones) leave out one at a time, identical records leave out together.
`legacy=True` gives the 2017 revision (a4f1afd): the prediction always normalised, human answers never
whitespace-cleaned and only punctuation-processed, only when not all identical.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mm_moe.errors import InputError
from mm_moe.formats.vqa import check_results, clean, process_digit_article, process_punctuation, read_annotations, read_questions


def vqa_accuracy(prediction: str, answers: Sequence[str | dict], legacy: bool = False) -> float:
    """Accuracy of one prediction against the human answers (strings, or the annotation's answer records):
    the mean over leave-one-out subsets of min(1, matches / 3), as vqaEval.py computes it."""
    records = [dict(a) if isinstance(a, dict) else {"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    pred = clean(prediction)
    if legacy:
        pred = process_digit_article(process_punctuation(pred))
        if len({r["answer"] for r in records}) > 1:
            for r in records:
                r["answer"] = process_punctuation(r["answer"])
    else:
        for r in records:
            r["answer"] = clean(r["answer"])
        if len({r["answer"] for r in records}) > 1:
            for r in records:
                r["answer"] = process_digit_article(process_punctuation(r["answer"]))
            pred = process_digit_article(process_punctuation(pred))
    accs = [min(1.0, sum(o["answer"] == pred for o in records if o != left_out) / 3) for left_out in records]
    return sum(accs) / len(accs)


def evaluate(results: list[dict], annotations: str | Path, questions: str | Path, legacy: bool = False) -> dict:
    """Score [{"question_id", "answer"}] like vqaEval: percentages rounded to 2 decimals (overall and per type
    from the unrounded accuracies, per question each rounded), as its accuracy / evalQA dicts.

    Every question of the question file must have exactly one result (as the official loadRes asserts).
    `legacy`: the 2017 revision of vqaEval.py.
    """
    anns = read_annotations(annotations)
    qids = {q["question_id"] for q in read_questions(questions)}
    check_results(results)
    by_qid = {r["question_id"]: r["answer"] for r in results}
    if set(by_qid) != qids or len(by_qid) != len(results):
        missing, extra = qids - set(by_qid), set(by_qid) - qids
        raise InputError(f"results must answer every question of {questions} once: {len(missing)} missing "
                         f"(e.g. {sorted(missing)[:3]}), {len(extra)} unknown (e.g. {sorted(extra)[:3]}), "
                         f"{len(results) - len(by_qid)} duplicated")
    per_q, accs, per_answer_type, per_question_type = {}, [], defaultdict(list), defaultdict(list)
    for qid in sorted(qids):
        if qid not in anns:
            raise InputError(f"{annotations}: no annotation for question_id {qid} of {questions}")
        ann = anns[qid]
        acc = vqa_accuracy(by_qid[qid], ann["answers"], legacy)
        per_q[qid] = round(100 * acc, 2)
        accs.append(acc)
        per_answer_type[ann["answer_type"]].append(acc)
        per_question_type[ann["question_type"]].append(acc)

    def pct(xs: list[float]) -> float:
        return round(100 * sum(xs) / len(xs), 2)

    return {
        "overall": pct(accs),
        "per_answer_type": {k: pct(v) for k, v in sorted(per_answer_type.items())},
        "per_question_type": {k: pct(v) for k, v in sorted(per_question_type.items())},
        "per_question": per_q,
    }


__all__ = ["vqa_accuracy", "evaluate"]
