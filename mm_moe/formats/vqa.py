"""VQA v2's official files (questions, annotations, results) with checks that name the file and record, and the
official answer normalisation (vqaEval.py's processPunctuation and processDigitArticle, see
`mm_moe.eval.vqa_metric` for when it applies). Shared by the data pipeline (answer vocabulary, soft targets) and
the metric, below both."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mm_moe.errors import InputError

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=digit", so any '.' not followed by a digit
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, add apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Whitespace cleaning, processPunctuation and processDigitArticle: what vqaEval does to both sides when the
    human answers disagree; the answer vocabulary and the soft targets use it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _read(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err


def _records(path: str | Path, key: str) -> list[dict]:
    data = _read(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise InputError(f"{path}: expected a top-level {key!r} list (official VQA v2 format)")
    for i, r in enumerate(data[key]):
        if not isinstance(r, dict) or not isinstance(r.get("question_id"), int):
            raise InputError(f"{path}: {key}[{i}]: expected an object with an integer 'question_id', got {r!r:.80}")
    return data[key]


def read_questions(path: str | Path) -> list[dict]:
    """The questions of an official VQA v2 questions file; question ids must be unique."""
    questions = _records(path, "questions")
    seen: set[int] = set()
    for i, q in enumerate(questions):
        if q["question_id"] in seen:
            raise InputError(f"{path}: questions[{i}]: question_id {q['question_id']} appears twice")
        seen.add(q["question_id"])
    return questions


def read_annotations(path: str | Path, fields: tuple[str, ...] = ("answer_type", "question_type")) -> dict[int, dict]:
    """Annotations of an official VQA v2 file by question id; each has a non-empty `answers` list of
    {"answer": str} and the string `fields`. Duplicated question ids are an error."""
    out: dict[int, dict] = {}
    for i, ann in enumerate(_records(path, "annotations")):
        where, qid = f"{path}: annotations[{i}] (question_id {ann['question_id']})", ann["question_id"]
        answers = ann.get("answers")
        if not isinstance(answers, list) or not answers:
            raise InputError(f"{where}: 'answers' must be a non-empty list, got {answers!r:.80}")
        for j, a in enumerate(answers):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise InputError(f"{where}: answers[{j}]: expected {{'answer': string}}, got {a!r:.80}")
        for field in fields:
            if not isinstance(ann.get(field), str):
                raise InputError(f"{where}: {field!r} must be a string, got {ann.get(field)!r:.80}")
        if qid in out:
            raise InputError(f"{where}: question_id appears twice")
        out[qid] = ann
    return out


def read_results(path: str | Path) -> list[dict]:
    """A results file: [{"question_id": int, "answer": str}, ...] (the test-dev submission format)."""
    data = _read(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of {{'question_id', 'answer'}} objects, got a {type(data).__name__}")
    check_results(data, str(path))
    return data


def check_results(results: list, where: str = "results") -> None:
    """Every entry is {"question_id": int, "answer": str}."""
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("question_id"), int) or not isinstance(r.get("answer"), str):
            raise InputError(f"{where}[{i}]: expected {{'question_id': int, 'answer': string}}, got {r!r:.80}")


__all__ = ["normalize_answer", "process_punctuation", "process_digit_article", "clean", "read_questions",
           "read_annotations", "read_results", "check_results"]
