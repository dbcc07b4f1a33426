"""Routers, losses and routing statistics against hand-computed values and properties that must hold."""

from __future__ import annotations

import math

import pytest
import torch
from moe_reference import expert_ffn

from mm_moe.config import FFNConfig
from mm_moe.moe import GroupedExperts, RoutingStats, activation_by_modality, build_ffn
from mm_moe.moe.routing import (
    RouterOutput,
    TopKRouter,
    XMoERouter,
    argmax_top2,
    balance_loss,
    drop_over_capacity,
    top_indices,
    update_routers,
    z_loss,
)


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    top1 = probs.argmax(-1)  # experts 0, 0, 1, 0
    valid = torch.ones(4, dtype=torch.bool)
    # f = [3/4, 1/4], P = [0.6, 0.4]: 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert balance_loss(probs, top1, valid).item() == pytest.approx(1.1)
    # the last token is padding: f = [2/3, 1/3], P = [0.5, 0.5]: 2 * (1/3 + 1/6) = 1.0
    valid[3] = False
    assert balance_loss(probs, top1, valid).item() == pytest.approx(1.0)
    # perfectly balanced routing gives the minimum, 1
    uniform = torch.full((4, 4), 0.25)
    assert balance_loss(uniform, torch.arange(4), torch.ones(4, dtype=torch.bool)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("experts", [3, 8, 80])
def test_top_indices_equal_topk(k, experts):
    scores = torch.randn(200, experts, generator=torch.Generator().manual_seed(experts))
    assert torch.equal(top_indices(scores, k), scores.topk(k, dim=-1).indices)


@pytest.mark.parametrize("experts", [3, 8, 80])
def test_argmax_top2_equals_topk_and_breaks_ties_to_the_lower_index(experts):
    scores = torch.randn(200, experts, generator=torch.Generator().manual_seed(experts))
    assert torch.equal(argmax_top2(scores), scores.topk(2, dim=-1).indices)
    tied = torch.tensor([[0.1, 0.5, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3], [0.0, 0.9, 0.1, 0.9]])
    assert argmax_top2(tied).tolist() == [[1, 2], [0, 1], [1, 3]]


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]])
    valid = torch.tensor([True, False])
    assert z_loss(logits, valid).item() == pytest.approx(math.log(4.0) ** 2)


def test_router_applies_coefficients_and_skips_padding():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, balance_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(6, 8)
    valid = torch.tensor([True, True, True, True, False, False])
    out = router(x, valid)
    top1 = out.probs.argmax(-1)  # expert_idx is -1 on padding rows, so take top-1 from the probabilities
    expected = 0.01 * balance_loss(out.probs, top1, valid) + 0.001 * z_loss(out.logits, valid)
    torch.testing.assert_close(out.aux_loss, expected)
    assert (out.expert_idx[~valid] == -1).all() and (out.weights[~valid] == 0).all()


def test_drop_over_capacity_gshard_priority():
    # 4 tokens, top-2, capacity 2: all first choices are served before any second choice
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    kept = drop_over_capacity(idx, num_experts=3, capacity=2)
    # expert 0: first choices of tokens 0, 1 kept; token 2's first choice dropped; token 3's second choice dropped
    # expert 1: token 3's first choice, then token 0's second choice; token 1's second choice dropped
    assert kept.tolist() == [[0, 1], [0, -1], [-1, 2], [1, -1]]


def test_xmoe_router_keeps_embeddings_at_norm_1_5_and_stays_differentiable_across_forwards():
    torch.manual_seed(0)
    router = XMoERouter(8, 4, 2).train()
    x1, x2 = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        router.expert_emb.mul_(3.0)  # as an optimizer step might; the next forward renormalises
    out1 = router(x1)
    out2 = router(x2)  # two forwards before one backward (e.g. NLVR2's two passes) must stay valid
    (out1.weights.sum() + out2.weights.sum()).backward()
    torch.testing.assert_close(router.expert_emb.norm(dim=1), torch.full((4,), 1.5))
    assert router.expert_emb.grad is not None and router.reduction.weight.grad is not None


def test_grouped_experts_match_reference_with_skipped_assignments():
    torch.manual_seed(0)
    for dispatch in ("grouped_mm", "loop"):
        experts = GroupedExperts(5, 16, 8, "swiglu", bias=True, dispatch=dispatch)
        x = torch.randn(7, 16)
        idx = torch.tensor([[0, 3], [3, -1], [4, 0], [-1, -1], [0, 1], [1, 3], [3, 0]])
        w = torch.rand(7, 2).masked_fill(idx < 0, 0)
        params = {n: p.detach() for n, p in experts.named_parameters()}
        ref = torch.stack([
            sum((w[t, j] * expert_ffn(x[t], params, int(idx[t, j])) for j in range(2) if idx[t, j] >= 0), torch.zeros(16))
            for t in range(7)
        ])
        torch.testing.assert_close(experts(x, idx, w), ref, atol=1e-5, rtol=1e-5)


def test_stats_hand_computed_for_forced_routing():
    # a router whose weights send every token's top-1 to expert 2
    layer = build_ffn(FFNConfig(kind="smoe", hidden=8, num_experts=4, top_k=1), 4)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[2] = 10.0
    x = torch.rand(1, 6, 4) + 0.5  # positive, so expert 2's logit is the largest
    pad = torch.tensor([[False] * 5 + [True]])
    s = layer(x, padding_mask=pad, stats=True).stats
    assert s.counts.tolist() == [[0, 0, 5, 0]]
    assert int(s.num_tokens) == 5
    assert s.activation_ratio() == 0.25  # one expert of four
    assert s.imbalance == pytest.approx(4.0)
    assert s.dropped_fraction == 0.0
    torch.testing.assert_close(s.load, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_activation_ratio_threshold_and_merge():
    a = RoutingStats(torch.tensor([[50, 30, 15, 5, 0]]), torch.tensor(100), 1, torch.tensor(0), torch.tensor(0.0))
    # uniform share k / E = 0.2: the bar is 0.1 * 0.2 = 0.02 of the tokens (5% passes), or 0.5 * 0.2 = 0.1
    assert a.activation_ratio() == pytest.approx(4 / 5)
    assert a.activation_ratio(share=0.5) == pytest.approx(3 / 5)
    assert a.activation_ratio(threshold=0.10) == pytest.approx(3 / 5)  # the absolute reading
    merged = a.merge(a)
    assert merged.counts.tolist() == [[100, 60, 30, 10, 0]] and int(merged.num_tokens) == 200
    assert merged.activation_ratio(share=0.5) == a.activation_ratio(share=0.5)


@pytest.mark.parametrize("experts,k", [(8, 1), (32, 2), (128, 1), (256, 2)])
def test_activation_ratio_is_scale_free(experts, k):
    """Uniform routing activates every expert at any E and k (an absolute 1% bar reads 0% at E = 128, k = 1);
    routing to half the experts uniformly reads 50%."""
    tokens = 100 * experts
    uniform = RoutingStats(torch.full((1, experts), tokens * k // experts), torch.tensor(tokens), k, torch.tensor(0),
                           torch.tensor(0.0))
    assert uniform.activation_ratio() == 1.0
    if experts >= 128 and k == 1:
        assert uniform.activation_ratio(threshold=0.01) == 0.0
    half = torch.zeros(1, experts, dtype=torch.long)
    half[0, ::2] = tokens * k // (experts // 2)
    assert RoutingStats(half, torch.tensor(tokens), k, torch.tensor(0), torch.tensor(0.0)).activation_ratio() == 0.5


def test_activation_by_modality():
    def stats(counts: list[int]) -> RoutingStats:
        return RoutingStats(torch.tensor([counts]), torch.tensor(100), 1, torch.tensor(0), torch.tensor(0.0))

    layers = {"blocks.1.ffn.v": stats([50, 50, 0, 0]), "blocks.1.ffn.l": stats([25, 25, 25, 25]),
              "blocks.3.ffn.v": stats([100, 0, 0, 0])}
    assert activation_by_modality(layers) == {"vision": pytest.approx(3 / 8), "language": 1.0}


def test_entropy_of_uniform_router_is_log_e():
    probs = torch.full((3, 4), 0.25)
    out = RouterOutput(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), probs, probs.log(),
                       torch.ones(3, dtype=torch.bool), torch.zeros(()), torch.tensor([3, 0, 0, 0]))
    assert RoutingStats.from_router(out).mean_entropy == pytest.approx(math.log(4))


def test_cartesian_pair_counts_are_consistent():
    torch.manual_seed(0)
    layer = build_ffn(FFNConfig(kind="cartesian", hidden=8, num_experts=5, top_k=2, num_shared_experts=1), 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[2, 5:] = True
    s = layer(torch.randn(3, 7, 16), padding_mask=pad, stats=True).stats
    n = int(s.num_tokens)
    assert n == 19 and s.counts.shape == (2, 5)
    assert int(s.pair_counts.sum()) == n * 2 * 2  # every token uses kA x kB pairs
    # each A expert appears in kB pairs per token it serves, and each B expert in kA
    assert (s.pair_counts.sum(1) == 2 * s.counts[0]).all()
    assert (s.pair_counts.sum(0) == 2 * s.counts[1]).all()


@pytest.mark.parametrize("kind", ["smoe", "xmoe", "cartesian"])
def test_renormalize_is_a_no_op_at_top1(kind):
    """At k = 1 renormalising would make every combine weight p / p = 1, cutting the router off from the task
    loss; as in the CartesianMoE code it applies only for k > 1: the task gradient of the router is the
    unrenormalised one, and not zero."""
    grads = {}
    for renormalize in (False, True):
        torch.manual_seed(0)
        cfg = FFNConfig(kind=kind, hidden=16, num_experts=4, top_k=1, renormalize=renormalize, balance_coef=0.0,
                        num_shared_experts=1 if kind == "cartesian" else 0)
        layer = build_ffn(cfg, 8)
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
        layer(x).out.square().sum().backward()
        grads[renormalize] = {n: p.grad.clone() for n, p in layer.named_parameters() if "router" in n}
    assert grads[False].keys() == grads[True].keys() and grads[True]
    for name, g in grads[True].items():
        assert torch.equal(g, grads[False][name]), name
        assert g.abs().sum() > 0, name


def test_aux_loss_free_bias_steers_selection_only_and_moves_by_the_step_load():
    """DeepSeek-V3 balancing: the bias decides which experts are chosen, the combine weights stay the softmax
    probabilities; after the step each bias moves by rate * sign(mean load - load), loads summed over the step's
    micro-batches; the bias is a buffer (checkpointed), not a parameter."""
    torch.manual_seed(0)
    cfg = FFNConfig(kind="smoe", hidden=8, num_experts=4, top_k=2, bias_update_rate=0.1, balance_coef=0.0)
    layer = build_ffn(cfg, 6).train()
    router = layer.router
    assert "router.expert_bias" in layer.state_dict() and "router.expert_bias" not in dict(layer.named_parameters())
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 always chosen
    seen = []
    router.register_forward_hook(lambda m, i, o: seen.append(o))
    x = [torch.randn(5, 6), torch.randn(3, 6)]
    pad = torch.tensor([False, False, False, False, True])
    layer(x[0], padding_mask=pad)
    layer(x[1])
    for out in seen:
        assert (out.expert_idx[out.valid][:, 0] == 3).all()  # chosen by the bias ...
        probs = out.probs.gather(1, out.expert_idx.clamp_min(0))
        torch.testing.assert_close(out.weights, probs * (out.expert_idx >= 0))  # ... weighted by its probability
    load = torch.zeros(4)
    for out in seen:
        for e in out.expert_idx[out.valid].flatten().tolist():
            load[e] += 1
    assert load.sum() == 2 * (4 + 3)
    update_routers(layer)
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.0, 0.0, 5.0]) + 0.1 * torch.sign(load.mean() - load))
    assert router.step_selections is None
    layer.eval()(x[1])  # evaluation routes with the bias but counts nothing
    assert router.step_selections is None


def test_global_balance_loss_uses_the_counts_of_the_steps_micro_batches():
    torch.manual_seed(0)
    cfg = FFNConfig(kind="smoe", hidden=8, num_experts=4, top_k=1, global_balance=True)
    layer = build_ffn(cfg, 6).train()
    seen = []
    layer.router.register_forward_hook(lambda m, i, o: seen.append(o))
    a, b = torch.randn(7, 6), torch.randn(5, 6)
    first = layer(a).aux_loss
    second = layer(b).aux_loss
    top1 = [o.expert_idx[:, 0] for o in seen]
    assert first.item() == pytest.approx(0.01 * balance_loss(seen[0].probs, top1[0], seen[0].valid).item())
    both = torch.bincount(torch.cat(top1), minlength=4).float()  # f of both micro-batches, P of the second
    p = seen[1].probs.mean(0)
    assert second.item() == pytest.approx(0.01 * 4 * (both / both.sum() * p).sum().item(), rel=1e-6)
    update_routers(layer)
    assert layer.router.step_top1 is None


@pytest.mark.parametrize("training", [True, False])
def test_official_capacity_is_k_times_ceil_tokens_over_experts_in_training_and_eval(training):
    """Hand-worked, by the MH-MoE code's rule: 5 tokens, 4 experts, top-2 -> k * ceil(5 / 4) = 4 slots per expert
    (capacity_factor=1.0 gives ceil(5 * 2 / 4) = 3, k - 1 fewer). Every token's first choice is expert 0 and its
    second expert 1 + token % 3: expert 0 keeps tokens 0-3 and drops token 4 (first choices in token order),
    where the factor rule drops tokens 3 and 4; the other experts have room in both."""
    router = TopKRouter(4, 4, 2, capacity_mode="official").train(training)
    factor = TopKRouter(4, 4, 2, capacity_factor=1.0).train(training)
    second = [1 + t % 3 for t in range(5)]
    logits = torch.full((5, 4), -5.0)
    logits[:, 0] = 5.0
    logits[torch.arange(5), second] = 0.0
    for r in (router, factor):
        with torch.no_grad():
            r.proj.weight.copy_(torch.eye(4))  # the token is its own logits
    official, by_factor = router(logits).expert_idx.tolist(), factor(logits).expert_idx.tolist()
    assert official == [[0, s] for s in second[:4]] + [[-1, second[4]]]
    assert by_factor == [[0, s] for s in second[:3]] + [[-1, second[3]], [-1, second[4]]]
    assert int(router.capacity(torch.tensor(5))) == 4 and int(factor.capacity(torch.tensor(5))) == 3
