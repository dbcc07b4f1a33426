"""The evaluation commands from a fine-tuned run directory, on the synthetic world: NLVR2 predictions in the
official CSV scored like lil-lab/nlvr metrics.py; VQA scored by the current vqaEval.py or its 2017 revision."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mm_moe.data import write_world
from mm_moe.data.nlvr2 import read_nlvr2
from mm_moe.eval import nlvr2_metrics, read_predictions

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.img_size=32", "model.d_model=32", "model.depth=2", "model.heads=2", "model.ffn.hidden=64",
        "model.moe.hidden=16", "model.moe.num_experts=4", "train.batch_size=4", "train.steps=2", "train.log_every=1"]


def script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, n_train=8, n_val=2, n_test=2, n_pairs_train=4, n_pairs_dev=3, size=32, shard_count=8)
    return out


@pytest.mark.slow
def test_eval_nlvr2_predicts_writes_the_official_csv_and_scores(tmp_path, world, capsys):
    run = tmp_path / "nlvr2"
    assert script("train_mm.py").main(
        ["finetune", "nlvr2", "--config", str(ROOT / "configs/finetune_nlvr2_demo.yaml"), *TINY, f"run_dir={run}",
         f"data.nlvr2_train={world}/nlvr2/train.json", f"data.nlvr2_images={world}/nlvr2/images", "data.nlvr2_dev=''"]) == 0
    capsys.readouterr()
    dev, csv = world / "nlvr2" / "dev.json", tmp_path / "dev.csv"
    evaluate = script("eval_nlvr2.py").main
    assert evaluate(["--ckpt", str(run), "--data", str(dev), "--images", str(world / "nlvr2" / "images"),
                     "--out", str(csv)]) == 0
    scored = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    rows = read_nlvr2(dev)
    lines = csv.read_text().splitlines()
    assert sorted(line.split(",")[0] for line in lines) == sorted(r["identifier"] for r in rows)
    assert all(line.split(",")[1] in ("True", "False") for line in lines)
    assert scored == nlvr2_metrics(rows, read_predictions(csv))
    assert evaluate(["--results", str(csv), "--data", str(dev)]) == 0  # scoring the file alone: the same figures
    assert json.loads(capsys.readouterr().out) == scored
    csv.write_text("\n".join(lines[:-1]) + "\n")
    assert evaluate(["--results", str(csv), "--data", str(dev)]) == 1
    assert f"Some predictions are missing! Got {len(rows) - 1} predictions but expected {len(rows)}" in \
        capsys.readouterr().err


def test_eval_vqa_current_and_legacy_revisions(tmp_path, capsys):
    """Ten "yes" and a prediction "Yes": the current vqaEval.py normalises nothing when the humans agree (0), the
    2017 revision always normalised the prediction (100)."""
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "question_type": "is the", "answer_type": "yes/no", "answers": answers}]}))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]}))
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": 1, "answer": "Yes"}]))
    args = ["--results", str(tmp_path / "r.json"), "--questions", str(tmp_path / "q.json"), "--annotations",
            str(tmp_path / "a.json")]
    evaluate = script("eval_vqa.py").main
    assert evaluate(args) == 0 and json.loads(capsys.readouterr().out)["overall"] == 0.0
    assert evaluate([*args, "--legacy-2017"]) == 0 and json.loads(capsys.readouterr().out)["overall"] == 100.0
