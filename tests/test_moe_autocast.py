"""bf16 autocast: forward and backward run, router math stays fp32, routing decisions do not change."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mm_moe.config import FFNConfig
from mm_moe.moe import build_ffn
from mm_moe.moe.routing import Router

D = 64
KINDS = {
    "smoe": dict(kind="smoe"),
    "xmoe": dict(kind="xmoe"),
    "mhmoe": dict(kind="mhmoe", heads=4),
    "cartesian": dict(kind="cartesian", num_shared_experts=1, activation="swiglu", renormalize=True),
}


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # CUDA autocast also runs layer_norm in fp32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subln", [False, True])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
@pytest.mark.parametrize("variant", list(KINDS))
def test_bf16_autocast_forward_backward(variant, dispatch, subln, device):
    if dispatch == "grouped_mm" and device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm on CUDA needs sm90+")
    torch.manual_seed(0)
    cfg = FFNConfig(hidden=32, num_experts=8, top_k=2, z_loss_coef=1e-3, dispatch=dispatch, subln=subln, **KINDS[variant])
    layer = build_ffn(cfg, D).to(device)
    routed = []
    for m in layer.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, inp, out: routed.append(out))
    x = torch.randn(2, 16, D, device=device, requires_grad=True)

    y32 = layer(x).out
    idx32 = [r.expert_idx for r in routed]
    routed.clear()
    with torch.autocast(device, dtype=torch.bfloat16):
        y, aux, _ = layer(x)
        loss = y.float().square().mean() + aux
    loss.backward()

    assert y.dtype == torch.bfloat16
    for r in routed:
        assert r.logits.dtype == r.probs.dtype == r.weights.dtype == r.aux_loss.dtype == torch.float32
    if variant != "cartesian":  # group B of CartesianMoE routes bf16-rounded x + yA, so it may differ
        for a, b in zip(idx32, [r.expert_idx for r in routed], strict=True):
            assert torch.equal(a, b)
    torch.testing.assert_close(y.float(), y32, atol=0.05, rtol=0.05)
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_expert_weights_are_cast_once_per_step_with_the_same_results():
    """Inside cast_weights_once (the trainer opens it around each optimizer step) every expert weight is cast to the
    compute dtype once, for all micro-batches' forwards and backwards; outputs and gradients equal casting per use.
    A weight changed in place inside the context (its version moves) is cast again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mm_moe.moe import cast_weights_once
    from mm_moe.moe.experts import GroupedExperts

    class WeightCasts(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.count = shapes, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            to_bf16 = (kwargs or {}).get("dtype") == torch.bfloat16
            if func.overloadpacket.__name__ == "_to_copy" and to_bf16 and tuple(args[0].shape) in self.shapes:
                self.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 24, "swiglu", bias=True)
    shapes = {tuple(p.shape) for p in (experts.w1, experts.w2, experts.w3)}
    batches = [(torch.randn(10, 16), torch.randint(0, 4, (10, 2)), torch.rand(10, 2)) for _ in range(2)]
    runs = []
    for once in (False, True):
        experts.zero_grad()
        with cast_weights_once() if once else contextlib.nullcontext(), WeightCasts(shapes) as casts:
            outs = []
            for x, idx, w in batches:  # two micro-batches of one step
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = experts(x, idx, w)
                y.float().square().sum().backward()
                outs.append(y)
        runs.append((outs, [p.grad.clone() for p in experts.parameters()], casts.count))
    (plain_out, plain_grads, plain_casts), (once_out, once_grads, once_casts) = runs
    for a, b in zip(plain_out + plain_grads, once_out + once_grads, strict=True):
        assert torch.equal(a, b)
    assert once_casts == 3 and plain_casts > 3 * 2  # once each; otherwise per forward and backward of each batch
    with cast_weights_once():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = experts(*batches[0])
        with torch.no_grad():
            experts.w2.mul_(2.0)  # a change inside the context (an optimizer step would be outside)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            after = experts(*batches[0])
    assert not torch.equal(before, after)
