"""Caption decoding with and without the cache, COCO caption scores against pycocoevalcap, NLVR2 metrics."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

from mm_moe.config import load_config
from mm_moe.data.tokenizer import load_tokenizer
from mm_moe.eval.captioning import BeamConfig, CaptionDecoder, score_captions
from mm_moe.eval.nlvr2 import nlvr2_metrics, write_predictions
from mm_moe.model import BEiT3Config, BEiT3ForCaptioning


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_with_cache_equals_without(tok, moe, beam):
    torch.manual_seed(0)
    overrides = ["d_model=64", "heads=2", "ffn.hidden=128", "moe.hidden=32"] + ([] if moe else ["moe=null"])
    model = BEiT3ForCaptioning(load_config(BEiT3Config, "configs/model/tiny.yaml", overrides))
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)  # peaked distributions, so beams really diverge
    images = torch.randn(3, 3, 64, 64)
    cfg = BeamConfig(beam_size=beam, max_len=10, min_len=3, no_repeat_ngram=2)
    cached = CaptionDecoder(model, tok, cfg, use_cache=True).generate(images)
    full = CaptionDecoder(model, tok, cfg, use_cache=False).generate(images)
    assert cached == full
    assert all(3 <= len(c) <= 10 for c in cached)
    for seq in cached:  # no bigram twice
        bigrams = list(itertools.pairwise(seq))
        assert len(bigrams) == len(set(bigrams))


def test_cached_step_logits_equal_full_forward(tok):
    torch.manual_seed(0)
    model = BEiT3ForCaptioning(load_config(BEiT3Config, "configs/model/tiny.yaml", ["d_model=64", "heads=2"]))
    dec_c, dec_f = CaptionDecoder(model, tok), CaptionDecoder(model, tok, use_cache=False)
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[101, 1037, 2417, 4418, 2012]] * 2)
    cache = dec_c._image_cache(images)
    for t in range(1, ids.shape[1] + 1):
        with torch.no_grad():
            cached = dec_c._step_cached(ids[:, :t], cache)
            full = dec_f._step_full(ids[:, :t], images)
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer and METEOR need java")
def test_caption_scores_equal_pycocoevalcap_scorers(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gt = {"images": [{"id": i} for i in (1, 2, 3)], "type": "captions", "info": {}, "licenses": [],
          "annotations": [{"image_id": 1, "id": 1, "caption": "A red circle at the top left."},
                          {"image_id": 1, "id": 2, "caption": "a red circle in the top left corner"},
                          {"image_id": 2, "id": 3, "caption": "Two shapes: a blue square and a green triangle."},
                          {"image_id": 2, "id": 4, "caption": "a blue square next to a green triangle"},
                          {"image_id": 3, "id": 5, "caption": "a yellow triangle at the bottom right."}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = [{"image_id": 1, "caption": "a red circle at the top left"},
               {"image_id": 2, "caption": "a blue square and a green circle"},
               {"image_id": 3, "caption": "a yellow triangle at the bottom right"}]
    ours = score_captions(path, results)
    # independent: the scorers on hand-tokenised text (lower case, punctuation dropped, as PTBTokenizer does)
    def norm(s):
        return " ".join(s.lower().replace(".", " ").replace(":", " ").split())
    gts = {a["image_id"]: [] for a in gt["annotations"]}
    for a in gt["annotations"]:
        gts[a["image_id"]].append(norm(a["caption"]))
    res = {r["image_id"]: [norm(r["caption"])] for r in results}
    bleu, _ = Bleu(4).compute_score(gts, res)
    for n in range(4):
        assert ours[f"BLEU-{n + 1}"] == pytest.approx(bleu[n])
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < ours["METEOR"] < 1
    # image 3 is an exact match: its own BLEU-1 is 1
    assert Bleu(1).compute_score({3: gts[3]}, {3: res[3]})[0][0] == pytest.approx(1.0)


def test_nlvr2_accuracy_and_consistency(tmp_path):
    rows = [{"identifier": f"dev-1-{p}-0", "sentence": "s1", "label": lab} for p, lab in enumerate(["True", "False"])]
    rows += [{"identifier": f"dev-2-{p}-0", "sentence": "s2", "label": lab} for p, lab in enumerate(["True", "True"])]
    preds = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-2-0-0": True, "dev-2-1-0": False}
    assert nlvr2_metrics(rows, preds) == {"accuracy": 75.0, "consistency": 50.0}
    write_predictions(tmp_path / "p.csv", preds)
    assert (tmp_path / "p.csv").read_text().splitlines()[1] == "dev-1-1-0,False"
    with pytest.raises(KeyError, match="no prediction for 1"):
        nlvr2_metrics(rows, {k: v for k, v in preds.items() if k != "dev-2-1-0"})
