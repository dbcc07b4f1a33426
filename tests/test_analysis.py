"""Expert analysis against independent computations: the masked-LM loss aggregated by hand from full logits,
the activation ratio counted from router decisions captured by hooks, and the top-1-disabled experiment
against a naive router that sorts each token's probabilities in Python."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from mm_moe.analysis import analyze, top1_disabled
from mm_moe.config import BEiT3Config, FFNConfig
from mm_moe.constants import IGNORE_INDEX
from mm_moe.engine.metrics import plot_curves
from mm_moe.model import BEiT3ForPretraining
from mm_moe.moe import Router, RouterOutput, TopKRouter


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


@contextmanager
def naive_routers(model: torch.nn.Module, skip_first: bool):
    """Replace every router's forward by a per-token Python sort over its softmax (ranks 1..k, or 2..k+1)."""

    def forward(router: Router, x: torch.Tensor, valid: torch.Tensor | None = None) -> RouterOutput:
        valid = torch.ones(x.shape[0], dtype=torch.bool) if valid is None else valid
        logits = router.score(x.float())
        probs = logits.softmax(-1)
        idx, weights = [], []
        for row in probs.tolist():
            ranked = sorted(range(len(row)), key=lambda e: -row[e])[int(skip_first):int(skip_first) + router.top_k]
            w = [row[e] for e in ranked]
            idx.append(ranked)
            weights.append([v / sum(w) for v in w] if router.renormalize and router.top_k > 1 else w)
        idx_t = torch.tensor(idx).masked_fill(~valid[:, None], -1)
        w_t = torch.tensor(weights).masked_fill(idx_t < 0, 0.0)
        counts = torch.stack([(idx_t == e).sum() for e in range(router.num_experts)])
        return RouterOutput(idx_t, w_t, probs, logits, valid, logits.new_zeros(()), counts)

    routers = [m for m in model.modules() if isinstance(m, Router)]
    for r in routers:
        r.forward = forward.__get__(r)
    try:
        yield
    finally:
        for r in routers:
            del r.forward


def masked_lm_loss(model: BEiT3ForPretraining, batches: list[dict]) -> float:
    """Token-weighted mean cross-entropy over every labelled position, from logits at all text positions."""
    total, count = 0.0, 0
    for b in batches:
        logits = model(images=b["images"], text_ids=b["masked_ids"], text_padding=b["text_padding"]).logits
        chosen = b["mlm_labels"] != IGNORE_INDEX
        total += F.cross_entropy(logits[chosen], b["mlm_labels"][chosen], reduction="sum").item()
        count += int(chosen.sum())
    return total / count


@pytest.mark.parametrize("kind", ["mhmoe", "cartesian"])
def test_analyze_against_independent_computations(tmp_path, kind):
    torch.manual_seed(0)
    moe = FFNConfig(kind=kind, hidden=16, num_experts=6, top_k=2, heads=2, renormalize=kind == "cartesian",
                    num_shared_experts=1 if kind == "cartesian" else 0)
    model = BEiT3ForPretraining(BEiT3Config(img_size=16, patch_size=8, vocab_size=60, max_text_len=8, d_model=16,
                                            depth=2, heads=2, ffn=FFNConfig(kind="dense", hidden=32), moe=moe,
                                            moe_layers="all")).eval()
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 60, (4, 6))
        labels = torch.where(torch.rand(4, 6) < 0.5, ids, torch.full_like(ids, IGNORE_INDEX))
        labels[:, 0] = ids[:, 0]
        padding = torch.zeros(4, 6, dtype=torch.bool)
        padding[0, 4:] = True
        labels[padding] = IGNORE_INDEX
        batches.append({"images": torch.randn(4, 3, 16, 16), "masked_ids": ids, "text_padding": padding,
                        "mlm_labels": labels})
    report = analyze(model, batches, tmp_path)

    with torch.no_grad():
        normal = masked_lm_loss(model, batches)
        with naive_routers(model, skip_first=False):
            assert masked_lm_loss(model, batches) == pytest.approx(normal, rel=1e-5)  # the naive router is faithful
        with naive_routers(model, skip_first=True):
            skipped = masked_lm_loss(model, batches)
    assert abs(skipped - normal) > 1e-3  # disabling the top-1 expert changes the loss
    assert report["mlm_loss"] == pytest.approx(normal, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(normal), rel=1e-5)
    assert report["top1_disabled"]["mlm_loss"] == pytest.approx(skipped, rel=1e-5)
    assert report["top1_disabled"]["perplexity_ratio"] == pytest.approx(math.exp(skipped - normal), rel=1e-5)

    # activation ratio: share of (router, expert) cells chosen for over 0.1 x k / E of that router's real (sub-)tokens
    counts: dict[int, torch.Tensor] = {}
    routed: dict[int, int] = {}

    def count(router, args, out):
        idx = out.expert_idx
        counts[id(router)] = counts.get(id(router), 0) + torch.stack([(idx == e).sum() for e in range(router.num_experts)])
        routed[id(router)] = routed.get(id(router), 0) + int(out.valid.sum())

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, Router)]
    with torch.no_grad():
        for b in batches:
            model(images=b["images"], text_ids=b["masked_ids"], text_padding=b["text_padding"])
    for h in hooks:
        h.remove()
    bars = {id(m): 0.1 * m.top_k / m.num_experts for m in model.modules() if isinstance(m, Router)}
    cells = torch.cat([counts[k] / routed[k] for k in counts])
    active = torch.cat([counts[k] / routed[k] > bars[k] for k in counts])
    assert len(counts) == 2 * 2 * (2 if kind == "cartesian" else 1)  # layers x branches x groups
    assert report["activation_ratio"] == pytest.approx(active.float().mean().item())
    assert report["activation_ratio_over_1pct"] == pytest.approx((cells > 0.01).float().mean().item())
    assert set(report["activation_ratio_by_modality"]) == {"vision", "language"}
    # load entropy: each router's load distribution, its entropy over log E, averaged over routers
    loads = [c.float() / c.sum() for c in counts.values()]
    entropies = [float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(len(p)) for p in loads]
    assert report["load_entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)

    assert len(report["layers"]) == 4
    pairs = [f for f in report["figures"] if "pairs_" in f]
    assert len(pairs) == (4 if kind == "cartesian" else 0)
    assert (tmp_path / "expert_load.png").stat().st_size > 0
    assert json.loads((tmp_path / "analysis.json").read_text())["perplexity"] == pytest.approx(report["perplexity"])


def test_plot_curves_uses_the_last_value_of_a_resumed_step(tmp_path):
    lines = [{"step": 1, "loss": 3.0, "aux_loss": 0.1, "load_imbalance": 2.0},
             {"step": 2, "loss": 2.0, "aux_loss": 0.1, "load_imbalance": 1.5},
             {"step": 2, "loss": 2.5, "aux_loss": 0.1, "load_imbalance": 1.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert plot_curves(tmp_path).stat().st_size > 0
    assert plot_curves(tmp_path / "missing") is None
