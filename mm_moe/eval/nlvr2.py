"""NLVR2 metrics: accuracy, and consistency (the share of unique sentences whose every example is right)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mm_moe.config import InputError


def nlvr2_metrics(rows: list[dict], predictions: dict[str, bool]) -> dict[str, float]:
    """rows: the official JSON Lines records (identifier, sentence, label); predictions: identifier -> truth.

    Consistency groups examples by their sentence (an NLVR2 sentence is paired with several image pairs).
    """
    missing = [r["identifier"] for r in rows if r["identifier"] not in predictions]
    if missing:
        raise InputError(f"no prediction for {len(missing)} identifier(s), e.g. {missing[:3]}")
    correct = {r["identifier"]: predictions[r["identifier"]] == (r["label"] == "True") for r in rows}
    by_sentence: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_sentence[r["sentence"]].append(correct[r["identifier"]])
    return {"accuracy": round(100 * sum(correct.values()) / len(rows), 2),
            "consistency": round(100 * sum(all(v) for v in by_sentence.values()) / len(by_sentence), 2)}


def write_predictions(path: str | Path, predictions: dict[str, bool]) -> None:
    """The NLVR2 predictions CSV: one `identifier,True|False` line per example."""
    Path(path).write_text("".join(f"{i},{p}\n" for i, p in predictions.items()))
