"""Every MoE layer equals the naive per-token, per-expert reference: outputs, aux loss and all gradients (fp32)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from moe_reference import REFERENCES, dense_ffn
from torch.utils._python_dispatch import TorchDispatchMode

from mm_moe.config import FFNConfig
from mm_moe.engine import SavedForBackward
from mm_moe.moe import build_ffn, matched_variants
from mm_moe.moe import grouped_mm as grouped_mm_ops
from mm_moe.moe.experts import GroupedExperts, Groups, _fold_pays, count_ids
from mm_moe.moe.layers import DenseFFN

D = 32
TOL = dict(atol=1e-5, rtol=1e-5)


def check_against_reference(cfg: FFNConfig, x: torch.Tensor, padding_mask: torch.Tensor | None = None, seed: int = 0):
    """Run the layer and the reference on the same parameters; compare outputs, aux loss and gradients."""
    torch.manual_seed(seed)
    layer = build_ffn(cfg, D).train()
    x = x.clone().requires_grad_(True)
    y, aux, stats = layer(x, padding_mask=padding_mask, stats=True)
    grad_out = torch.randn_like(y)
    ((y * grad_out).sum() + aux).backward()

    # the reference reads the parameters as they are after the forward (X-MoE renormalises in place)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    xr = x.detach().clone().requires_grad_(True)
    flat = xr.reshape(-1, D)
    valid = [True] * flat.shape[0] if padding_mask is None else (~padding_mask.reshape(-1)).tolist()
    y_ref, aux_ref = REFERENCES[cfg.kind](flat, valid, params, cfg)
    ((y_ref.reshape(y.shape) * grad_out).sum() + aux_ref).backward()

    torch.testing.assert_close(y, y_ref.reshape(y.shape), **TOL)
    torch.testing.assert_close(aux, aux_ref, **TOL)
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    for name, p in layer.named_parameters():
        ref_grad = params[name].grad
        if ref_grad is None:  # a parameter the reference never touched must get no (or zero) gradient
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, ref_grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return layer, stats


KINDS = {
    "smoe": dict(kind="smoe"),
    "smoe-shared-renorm": dict(kind="smoe", num_shared_experts=2, renormalize=True),  # SMoE-Share: gated shared
    "smoe-shared-added": dict(kind="smoe", num_shared_experts=1, shared_gate=False),  # DeepSeekMoE: added
    "xmoe": dict(kind="xmoe"),
    "mhmoe": dict(kind="mhmoe", heads=4),
    "mhmoe-linear-router": dict(kind="mhmoe", heads=2, router="linear"),
    "cartesian": dict(kind="cartesian", num_shared_experts=1, renormalize=True),
    "cartesian-noshared": dict(kind="cartesian"),
}


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
@pytest.mark.parametrize("activation,bias,subln", [("gelu", True, True), ("swiglu", False, False),
                                                   ("swiglu", False, True)])
@pytest.mark.parametrize("variant", list(KINDS))
def test_layer_matches_reference_with_padding(variant, activation, bias, subln, dispatch, recompute):
    cfg = FFNConfig(hidden=24, num_experts=6, top_k=2, activation=activation, bias=bias, subln=subln, dispatch=dispatch,
                    recompute=recompute, **KINDS[variant])
    x = torch.randn(2, 5, D)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    check_against_reference(cfg, x, pad)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("tokens", [5, 60])
def test_subln_affine_folded_into_w2_or_applied_per_row(tokens, recompute):
    """The sub-LN's per-expert affine is folded into W2 when the rows outnumber E x d_in, else applied row by row:
    the same function either way (outputs and every gradient against the reference)."""
    cfg = FFNConfig(kind="smoe", hidden=24, num_experts=6, top_k=2, subln=True, recompute=recompute)
    assert _fold_pays(2 * tokens * cfg.top_k, torch.empty(cfg.num_experts, cfg.hidden, D)) == (tokens == 60)
    check_against_reference(cfg, torch.randn(2, tokens, D))


@pytest.mark.parametrize("variant", list(KINDS))
def test_one_token_and_empty_experts(variant):
    # one token, top-1 over 8 experts: at least 7 experts (x heads for MH-MoE, fewer) receive nothing
    cfg = FFNConfig(hidden=16, num_experts=8, top_k=1, **KINDS[variant])
    _, stats = check_against_reference(cfg, torch.randn(1, 1, D))
    assert (stats.counts == 0).any()


@pytest.mark.parametrize("variant", list(KINDS))
def test_k_equals_num_experts(variant):
    cfg = FFNConfig(hidden=16, num_experts=4, top_k=4, **KINDS[variant])
    check_against_reference(cfg, torch.randn(3, 4, D))


@pytest.mark.parametrize("variant", ["smoe", "mhmoe", "cartesian"])
def test_capacity_dropping_matches_reference(variant):
    cfg = FFNConfig(hidden=16, num_experts=4, top_k=2, capacity_factor=0.5, **KINDS[variant])
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    _, stats = check_against_reference(cfg, torch.randn(2, 6, D), pad)
    assert stats.dropped_fraction > 0
    # kept + dropped = every valid (token, choice) assignment of every group
    kept = int(stats.counts.sum())
    assert kept + int(stats.num_dropped) == int(stats.num_tokens) * cfg.top_k * stats.num_groups


def test_count_ids_equals_bincount_of_the_kept_ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 7, (50, 3), generator=g)
    mask = torch.rand(50, 3, generator=g) < 0.7
    for m in (None, mask):
        kept = ids[(ids >= 0) if m is None else (ids >= 0) & m]
        assert count_ids(ids, 9, m).tolist() == torch.bincount(kept, minlength=9).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_sums_are_each_groups_row_sums_accumulated_in_float32(dtype):
    """Against plain per-group sums, an empty group included; bf16 rows are summed in float32 (4096 ones: a bf16
    accumulator would stop at 256)."""
    g = torch.randn(10, 3).to(dtype)
    offs, expert = torch.tensor([3, 3, 7, 10], dtype=torch.int32), torch.tensor([0] * 3 + [2] * 4 + [3] * 3)
    expected = torch.stack([g[s:e].float().sum(0) for s, e in zip([0, 3, 3, 7], [3, 3, 7, 10], strict=True)])
    out = grouped_mm_ops.group_sums(g, offs, expert)
    assert out.dtype == dtype and not out[1].any()
    torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=0)
    ones = torch.ones(4096, 2, dtype=dtype)
    sums = grouped_mm_ops.group_sums(ones, torch.tensor([1024, 4096], dtype=torch.int32), (torch.arange(4096) >= 1024).long())
    assert sums.tolist() == [[1024] * 2, [3072] * 2]


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read device memory back to the host (on CUDA, each stalls the stream). The
    project's custom ops (mm_moe::grouped_mm, ...) are run through their Python implementation, so that what they
    do inside is counted too."""

    READS: ClassVar[set[str]] = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2",
                                 "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.custom: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "mm_moe":
            self.custom.append(name)
            with self:
                return getattr(grouped_mm_ops, name)._init_fn(*args, **(kwargs or {}))
        if name in self.READS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


OPTIONS = {
    "dropless": {},
    "capacity": dict(capacity_factor=0.5),
    "swiglu-subln-bias-no-recompute": dict(activation="swiglu", subln=True, bias=True, recompute=False),
    "gelu-subln-bias-folded": dict(subln=True, bias=True, hidden=8),
    "z-loss-bias-balancing-global": dict(z_loss_coef=1e-3, bias_update_rate=1e-3, global_balance=True),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("variant", list(KINDS))
def test_no_host_read(variant, option, training):
    """Forward (with statistics) and backward never read the device back: all T x k assignment rows are kept, with
    skipped ones sorted last and masked, and routing, counts, capacity, stats and losses stay on the device, so a
    GPU step does not stall on an MoE layer. (dispatch=loop reads the group sizes inside the grouped op by design.)"""
    cfg = FFNConfig(**{**dict(hidden=24, num_experts=6, top_k=2), **KINDS[variant], **OPTIONS[option]})
    layer = build_ffn(cfg, D).train(training)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 3:] = True
    x = torch.randn(2, 9, D, requires_grad=True)
    with HostReads() as reads:
        y, aux, stats = layer(x, padding_mask=pad, stats=True)
        (y.sum() + aux).backward()
    assert reads.ops == []
    assert "grouped_mm" in reads.custom and stats is not None


def test_dense_ffn_matches_reference():
    torch.manual_seed(0)
    for activation, subln in (("gelu", True), ("swiglu", False)):
        layer = DenseFFN(D, 24, activation, subln=subln)
        x = torch.randn(5, D)
        params = {n: p.detach() for n, p in layer.named_parameters()}
        y, aux, stats = layer(x, stats=True)
        torch.testing.assert_close(y, torch.stack([dense_ffn(t, params) for t in x]), **TOL)
        assert float(aux) == 0.0 and stats is None


@pytest.mark.parametrize("variant", list(KINDS))
def test_padding_changes_nothing_for_real_tokens(variant):
    """A padded batch gives the same outputs, aux loss and stats for its real tokens as the unpadded one."""
    torch.manual_seed(1)
    cfg = FFNConfig(hidden=16, num_experts=4, top_k=2, **KINDS[variant])
    layer = build_ffn(cfg, D)
    real = torch.randn(1, 5, D)
    y, aux, stats = layer(real, stats=True)
    padded = torch.cat([real, 100 * torch.randn(1, 3, D)], dim=1)
    pad = torch.tensor([[False] * 5 + [True] * 3])
    y_pad, aux_pad, stats_pad = layer(padded, padding_mask=pad, stats=True)
    torch.testing.assert_close(y_pad[:, :5], y, **TOL)
    torch.testing.assert_close(aux_pad, aux, **TOL)
    assert torch.equal(stats_pad.counts, stats.counts)
    assert int(stats_pad.num_tokens) == int(stats.num_tokens)
    assert stats_pad.mean_entropy == pytest.approx(stats.mean_entropy, rel=1e-5)


def test_padding_mask_shape_is_checked():
    layer = build_ffn(FFNConfig(kind="smoe", hidden=16, num_experts=4), D)
    with pytest.raises(ValueError, match="padding_mask shape"):
        layer(torch.randn(2, 5, D), padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_build_ffn_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        build_ffn(FFNConfig(kind="moe"), D)  # type: ignore[arg-type]


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("d_hidden,bias", [(8, False), (48, False), (8, True)])
def test_row_weights_scale_the_outputs(d_hidden, bias, recompute):
    """grouped_ffn(..., row_weights) takes the weights' gradient from the hidden units (<gy W2^T, hidden>, plus the
    output bias term): output and every gradient must equal scaling the unweighted output."""
    torch.manual_seed(0)
    experts = GroupedExperts(3, 16, d_hidden, "swiglu", bias=bias, recompute=recompute)
    xs, counts, w = torch.randn(10, 16), torch.tensor([4, 0, 6]), torch.rand(10)
    groups = Groups(counts.cumsum(0).int(), torch.repeat_interleave(torch.arange(3), counts))
    grad = torch.randn(10, 16)
    results = []
    for weighted in (True, False):
        experts.zero_grad()
        x, wr = xs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = experts.grouped_ffn(x, groups, row_weights=wr) if weighted else experts.grouped_ffn(x, groups) * wr[:, None]
        (y * grad).sum().backward()
        results.append([y, x.grad, wr.grad, *(p.grad.clone() for p in experts.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_saved_for_backward_counts_distinct_storages_without_parameters():
    x, w = torch.randn(8, 4, requires_grad=True), torch.nn.Parameter(torch.randn(4, 6))
    with SavedForBackward(exclude=[w]) as saved:
        y = (x @ w).relu()  # mm saves x (32 floats) and w (excluded); relu saves its output (48 floats)
        (y * y).sum()  # y saved twice more: the same storage, counted once
    assert saved.bytes == (32 + 48) * 4


@pytest.mark.parametrize("activation,bias,subln", [("gelu", True, True), ("swiglu", False, False)])
def test_experts_save_only_their_input_and_first_projections(activation, bias, subln):
    """Backward gathers the rows again and recomputes the elementwise work: what stays is x, the first projections
    (h, and the SwiGLU gate), the row weights and the row indices, never a gathered copy or an activation."""
    torch.manual_seed(0)
    t, k, d_in, hidden, e = 10, 2, 16, 24, 4
    experts = GroupedExperts(e, d_in, hidden, activation, bias=bias, subln=subln)
    x, weights = torch.randn(t, d_in, requires_grad=True), torch.rand(t, k, requires_grad=True)
    with SavedForBackward(exclude=experts.parameters()) as saved:
        experts(x, torch.randint(0, e, (t, k)), weights)
    n = t * k
    projections = 2 if activation == "swiglu" else 1
    # indices: the token of each row and where each assignment sits (+ its expert, for biases and sub-LN); then the
    # group offsets, and which rows are kept (a skipped assignment's weight is masked to 0, whatever it was)
    indices = 3 if bias or subln else 2
    assert saved.bytes == 4 * (t * d_in + projections * n * hidden + n) + 8 * indices * n + 4 * e + n
    experts.recompute = False  # autograd keeps the gathered rows and the elementwise intermediates too
    with SavedForBackward(exclude=experts.parameters()) as kept:
        experts(x, torch.randint(0, e, (t, k)), weights)
    assert kept.bytes > saved.bytes + 4 * n * (d_in + hidden)


def test_official_init_draws_every_weight_from_n_0_002_and_zeroes_every_bias():
    """init=official (the CartesianMoE code): projections, stacked experts, router and coefficient gate from
    N(0, 0.02), biases 0, norms untouched; the default keeps torch's fan-in uniform init."""
    torch.manual_seed(0)
    for cfg in matched_variants(256, 1024, subln=True).values():
        if cfg is None:
            continue
        layer = build_ffn(dataclasses.replace(cfg, init="official"), 256)
        weights = [p for n, p in layer.named_parameters() if n.rsplit(".", 1)[-1] in ("weight", "w1", "w2", "w3",
                   "expert_emb") and p.dim() >= 2]
        flat = torch.cat([w.detach().flatten() for w in weights])
        assert abs(flat.std().item() - 0.02) < 3 * 0.02 / (2 * flat.numel()) ** 0.5 + 1e-4, cfg.kind
        assert abs(flat.mean().item()) < 5 * 0.02 / flat.numel() ** 0.5, cfg.kind
        for n, p in layer.named_parameters():
            last = n.rsplit(".", 1)[-1]
            if last in ("bias", "b1", "b2", "b3") and "norm" not in n:
                assert not p.any(), n
            if last in ("norm_w",) or n.endswith("norm.weight"):
                assert (p == 1).all(), n
        default = build_ffn(cfg, 256)
        assert abs(torch.cat([p.detach().flatten() for n, p in default.named_parameters()
                              if n.endswith("experts.w1")]).std().item() - 0.02) > 0.005


def test_fine_grained_shared_expert_is_half_the_sum_of_two_half_size_ffns():
    """The CartesianMoE code's fine-grained baseline: shared = 0.5 x (mlp0(h) + mlp1(h)) over two half-size FFNs.
    Ours holds them as one FFN of their joint width; its halves, run as two FFNs by hand, give the layer's output
    (shared gate off, so the sum is plain)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(matched_variants(32, 128)["finegrained"], shared_gate=False, subln=False)
    assert cfg.shared_scale == 0.5 and cfg.shared_hidden == 2 * cfg.hidden
    layer = build_ffn(cfg, 32).eval()
    x = torch.randn(2, 5, 32)
    out = layer(x).out
    fc1, fc2, half = layer.shared.fc1, layer.shared.fc2, cfg.hidden

    def mlp(part: slice) -> torch.Tensor:
        return F.gelu(x @ fc1.weight[part].T + fc1.bias[part]) @ fc2.weight[:, part].T

    # the two FFNs' output biases: any two that add up to our one (here half of it each)
    shared = 0.5 * ((mlp(slice(0, half)) + fc2.bias / 2) + (mlp(slice(half, 2 * half)) + fc2.bias / 2))
    routed = build_ffn(dataclasses.replace(cfg, num_shared_experts=0), 32).eval()
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    torch.testing.assert_close(out, routed(x).out + shared, atol=1e-6, rtol=1e-5)
