"""bf16 autocast: forward and backward run, router math stays fp32, routing decisions do not change."""

from __future__ import annotations

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
