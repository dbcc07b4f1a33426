"""Expert analysis: top-1-disabled routing, heatmaps and pair matrices, training curves."""

from __future__ import annotations

import json

import pytest
import torch

from mm_moe.analysis import analyze, plot_curves, top1_disabled
from mm_moe.config import FFNConfig
from mm_moe.model import BEiT3Config, BEiT3ForPretraining
from mm_moe.moe.routing import TopKRouter


def test_top1_disabled_routes_to_the_next_choices():
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 2)
    x = torch.randn(10, 8)
    normal = router(x)
    holder = torch.nn.Sequential(router)
    with top1_disabled(holder):
        skipped = router(x)
    top3 = normal.probs.topk(3, dim=-1)
    assert torch.equal(skipped.expert_idx, top3.indices[:, 1:])
    torch.testing.assert_close(skipped.weights, top3.values[:, 1:])
    assert not router.skip_top1  # restored
    with pytest.raises(ValueError, match="cannot disable"), top1_disabled(torch.nn.Sequential(TopKRouter(8, 2, 2))):
        pass


@pytest.mark.parametrize("kind", ["mhmoe", "cartesian"])
def test_analyze_writes_heatmaps_and_robustness(tmp_path, kind):
    torch.manual_seed(0)
    moe = FFNConfig(kind=kind, hidden=16, num_experts=6, top_k=2, heads=2,
                    num_shared_experts=1 if kind == "cartesian" else 0)
    model = BEiT3ForPretraining(BEiT3Config(img_size=16, patch_size=8, vocab_size=60, max_text_len=8, d_model=16,
                                            depth=2, heads=2, ffn=FFNConfig(kind="dense", hidden=32), moe=moe,
                                            moe_layers="all"))
    ids = torch.randint(1, 60, (4, 6))
    labels = torch.where(torch.rand(4, 6) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    batch = {"images": torch.randn(4, 3, 16, 16), "masked_ids": ids, "text_padding": torch.zeros(4, 6, dtype=torch.bool),
             "mlm_labels": labels}
    report = analyze(model, [batch], tmp_path)
    assert (tmp_path / "expert_load.png").stat().st_size > 0
    assert len(report["layers"]) == 4 and 0 < report["activation_ratio"] <= 1
    assert report["top1_disabled"]["mlm_loss"] != report["mlm_loss"]
    pairs = [f for f in report["figures"] if "pairs_" in f]
    assert len(pairs) == (4 if kind == "cartesian" else 0)
    assert json.loads((tmp_path / "analysis.json").read_text())["perplexity"] == pytest.approx(report["perplexity"])


def test_plot_curves_uses_the_last_value_of_a_resumed_step(tmp_path):
    lines = [{"step": 1, "loss": 3.0, "aux_loss": 0.1, "load_imbalance": 2.0},
             {"step": 2, "loss": 2.0, "aux_loss": 0.1, "load_imbalance": 1.5},
             {"step": 2, "loss": 2.5, "aux_loss": 0.1, "load_imbalance": 1.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert plot_curves(tmp_path).stat().st_size > 0
    assert plot_curves(tmp_path / "missing") is None
