"""Caption decoding with and without the cache, COCO caption scores against pycocoevalcap, NLVR2 metrics."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil

import pytest
import torch

from mm_moe.config import BEiT3Config
from mm_moe.config_files import load_config
from mm_moe.data import load_tokenizer
from mm_moe.errors import InputError
from mm_moe.eval import nlvr2_metrics, read_predictions, score_captions, shard_indices, text_only_predictions, write_predictions
from mm_moe.model import BeamConfig, BEiT3ForCaptioning, CaptionDecoder


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


def test_next_token_logits_equal_the_plain_forward(tok):
    """The cached decode step (one new real token and a [MASK] per call) against the model's own forward over
    image + text + [MASK] under the captioning mask, at every length."""
    torch.manual_seed(0)
    model = BEiT3ForCaptioning(load_config(BEiT3Config, "configs/model/tiny.yaml", ["d_model=64", "heads=2"])).eval()
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[101, 1037, 2417, 4418, 2012], [101, 2048, 2630, 7539, 1012]])
    mask_id = tok.mask_token_id
    with torch.no_grad():
        cache = model.encode_image(images)
        for t in range(1, ids.shape[1] + 1):
            cached = model.next_token_logits(ids[:, :t], mask_id, cache=cache)
            assert len(cache) == model.beit3.vision.num_patches + 1 + t  # the image, then every real token
            text = torch.cat([ids[:, :t], torch.full_like(ids[:, :1], mask_id)], 1)
            plain = model(images, text).logits[:, -1]  # labels=None: logits at every text position
            torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(model.next_token_logits(ids[:, :t], mask_id, images=images), plain)


JAVA = pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer and METEOR need java")


def _coco_gt(path, refs: dict[int, list[str]]):
    anns = [{"image_id": i, "id": n, "caption": c} for n, (i, c) in
            enumerate((i, c) for i, caps in refs.items() for c in caps)]
    path.write_text(json.dumps({"images": [{"id": i} for i in refs], "type": "captions", "info": {}, "licenses": [],
                                "annotations": anns}))
    return path


@JAVA
def test_caption_scores_equal_hand_computed_bleu_and_cider(tmp_path):
    """Two images with one reference each and no n-gram in common between them (so every idf is log 2).

    Image 1 is matched exactly; image 2's candidate "a red circle on top" against "a red circle on the top"
    matches 5/5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 four-grams.
    """
    gt = _coco_gt(tmp_path / "gt.json", {1: ["Two blue squares here."], 2: ["A red circle on the top."]})
    results = [{"image_id": 1, "caption": "two blue squares here"}, {"image_id": 2, "caption": "a red circle on top"}]
    ours = score_captions(gt, results)
    # corpus BLEU: clipped n-gram matches summed over images, brevity penalty exp(1 - r / c) with c = 9, r = 10
    precisions = [(4 + 5) / (4 + 5), (3 + 3) / (3 + 4), (2 + 2) / (2 + 3), (1 + 1) / (1 + 2)]
    bp = math.exp(1 - 10 / 9)
    for n in range(1, 5):
        assert ours[f"BLEU-{n}"] == pytest.approx(bp * math.prod(precisions[:n]) ** (1 / n), rel=1e-6)
    # CIDEr-D: 10 x mean over n of clipped cosine similarity (idf is one constant here, so it cancels),
    # times the length penalty exp(-(5 - 6)^2 / (2 * 6^2)); image 1 scores 10
    cosines = [5 / math.sqrt(5 * 6), 3 / math.sqrt(4 * 5), 2 / math.sqrt(3 * 4), 1 / math.sqrt(2 * 3)]
    image2 = 10 * math.exp(-1 / 72) * sum(cosines) / 4
    assert ours["CIDEr"] == pytest.approx((10 + image2) / 2, rel=1e-6)
    assert ours["ROUGE-L"] == pytest.approx((1 + _rouge_l(5, 6, 5)) / 2, rel=1e-6)
    assert 0 < ours["METEOR"] <= 1
    without = score_captions(gt, results, use_meteor=False)
    assert without == {k: v for k, v in ours.items() if k != "METEOR"}  # validation's cheaper scoring


def _rouge_l(cand: int, ref: int, lcs: int, beta: float = 1.2) -> float:
    """ROUGE-L F-measure of one candidate/reference pair from their lengths and longest common subsequence."""
    p, r = lcs / cand, lcs / ref
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def test_nlvr2_accuracy_and_consistency_as_the_official_script(tmp_path):
    """Groups are identifiers with the third part blanked (lil-lab/nlvr metrics.py), not sentence texts: here
    the text "s1" belongs to two groups, so grouping by text would give 1 of 2 consistent (50)."""
    rows = [{"identifier": "dev-1-0-0", "sentence": "s1", "label": "True"},
            {"identifier": "dev-1-1-0", "sentence": "s1", "label": "False"},
            {"identifier": "dev-2-0-0", "sentence": "s1", "label": "True"},
            {"identifier": "dev-2-0-1", "sentence": "s2", "label": "True"}]
    preds = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-2-0-0": False, "dev-2-0-1": True}
    # 3 of 4 right; groups dev-1--0 (right, right), dev-2--0 (wrong), dev-2--1 (right): 2 of 3 consistent
    assert nlvr2_metrics(rows, preds) == {"accuracy": 75.0, "consistency": pytest.approx(200 / 3)}
    write_predictions(tmp_path / "p.csv", preds)
    assert (tmp_path / "p.csv").read_text().splitlines()[1] == "dev-1-1-0,False"
    assert nlvr2_metrics(rows, read_predictions(tmp_path / "p.csv")) == nlvr2_metrics(rows, preds)
    assert nlvr2_metrics(rows, {k: str(v).upper() for k, v in preds.items()})["accuracy"] == 75.0  # case-insensitive
    with pytest.raises(InputError, match="Some predictions are missing\\! Got 3 predictions but expected 4"):
        nlvr2_metrics(rows, {k: v for k, v in preds.items() if k != "dev-2-0-1"})
    (tmp_path / "bad.csv").write_text("dev-1-0-0,True\ndev-1-1-0,maybe\n")
    with pytest.raises(InputError, match=re.escape("bad.csv:2: expected 'identifier,True|False', got 'dev-1-1-0,maybe'")):
        read_predictions(tmp_path / "bad.csv")


def test_the_nlvr2_text_only_baseline_answers_each_wording_with_its_training_majority():
    """Hand-worked: "a" is True 2 of 3 times in training, "b" False; "c" never seen takes training's majority
    label (False, 3 of 5); the wording is matched without case or surrounding spaces."""
    train = [{"sentence": "a", "label": "True"}, {"sentence": "a", "label": "True"}, {"sentence": "A ", "label": False},
             {"sentence": "b", "label": "False"}, {"sentence": "b", "label": False}]
    dev = [{"identifier": "dev-0-0-0", "sentence": "a", "label": "True"},
           {"identifier": "dev-0-1-0", "sentence": " B", "label": "True"},
           {"identifier": "dev-0-2-0", "sentence": "c", "label": "False"}]
    predictions = text_only_predictions(train, dev)
    assert predictions == {"dev-0-0-0": "True", "dev-0-1-0": "False", "dev-0-2-0": "False"}
    assert nlvr2_metrics(dev, predictions)["accuracy"] == pytest.approx(200 / 3)


def test_shard_indices_cover_the_split_once_in_order_with_equal_slices():
    """Validation under torchrun: the ranks' own items, concatenated in rank order, are the split in order; every
    rank gets ceil(n / world) items (padding repeats the last item), so all run the same batches."""
    for n, world in itertools.product(range(1, 14), range(1, 6)):
        slices = [shard_indices(n, rank, world) for rank in range(world)]
        assert [i for idx, own in slices for i in idx[:own]] == list(range(n)), (n, world)
        assert {len(idx) for idx, _ in slices} == {-(-n // world)}
        assert all(set(idx[own:]) <= {n - 1} for idx, own in slices)
