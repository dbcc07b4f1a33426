"""NLVR2 metrics as the official lil-lab/nlvr `nlvr2/eval/metrics.py` computes them: accuracy, and consistency
(the share of sentences whose every example is right), with the official grouping and CSV format."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mm_moe.errors import InputError


def consistency_key(identifier: str) -> str:
    """The official grouping of examples into sentences: the identifier with its third dash-separated part
    blanked ("dev-850-0-1" -> "dev-850--1"; the sentence text itself is not used)."""
    parts = identifier.split("-")
    if len(parts) < 3:
        raise InputError(f"NLVR2 identifier {identifier!r}: expected split-set-pair-sentence (e.g. 'dev-850-0-1')")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_metrics(rows: list[dict], predictions: dict[str, bool | str]) -> dict[str, float]:
    """rows: the labelled JSON Lines records (identifier, label); predictions: identifier -> True / False (or the
    official CSV's strings, compared case-insensitively). Accuracy and consistency in percent, unrounded (the
    official script prints the fractions)."""
    if len(predictions) < len(rows):
        missing = [r["identifier"] for r in rows if r["identifier"] not in predictions]
        raise InputError(f"Some predictions are missing! Got {len(predictions)} predictions but expected {len(rows)} "
                         f"(missing e.g. {missing[:3]})")
    consistent: dict[str, bool] = {}
    correct = 0
    for r in rows:
        key = consistency_key(r["identifier"])
        consistent.setdefault(key, True)
        if r["identifier"] not in predictions:
            raise InputError(f"no prediction for identifier {r['identifier']!r}")
        if str(predictions[r["identifier"]]).lower() == str(r["label"]).lower():
            correct += 1
        else:
            consistent[key] = False
    return {"accuracy": 100 * correct / len(rows), "consistency": 100 * sum(consistent.values()) / len(consistent)}


def text_only_predictions(train: list[dict], rows: list[dict]) -> dict[str, str]:
    """The text-only baseline: each statement answered with the label its exact wording (lower-cased) has most
    often in `train`, and an unseen wording with train's most common label. Templated statements leak their
    label this way; a model must beat this, not chance, to show it reads the images."""
    by_text: dict[str, Counter] = {}
    for r in train:
        by_text.setdefault(r["sentence"].strip().lower(), Counter())[str(r["label"])] += 1
    overall = Counter(str(r["label"]) for r in train).most_common(1)[0][0]
    return {r["identifier"]: by_text[text].most_common(1)[0][0] if (text := r["sentence"].strip().lower()) in by_text
            else overall for r in rows}


def write_predictions(path: str | Path, predictions: dict[str, bool]) -> None:
    """The official predictions CSV: one `identifier,True|False` line per example, no header."""
    Path(path).write_text("".join(f"{i},{p}\n" for i, p in predictions.items()))


def read_predictions(path: str | Path) -> dict[str, str]:
    """An official predictions CSV (`identifier,prediction` lines) as identifier -> prediction."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) < 2 or parts[1].lower() not in ("true", "false"):
            raise InputError(f"{path}:{n}: expected 'identifier,True|False', got {line.strip()!r:.60}")
        out[parts[0]] = parts[1]
    return out


__all__ = ["consistency_key", "nlvr2_metrics", "text_only_predictions", "write_predictions", "read_predictions"]
