"""BEiT3 encoder and task models: masks, padding, gradient flow, aux losses, MoE placement, upcycling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm_moe.config import FFNConfig
from mm_moe.config_files import load_config
from mm_moe.errors import ConfigError
from mm_moe.model import (
    BEiT3,
    BEiT3Config,
    BEiT3ForCaptioning,
    BEiT3ForNLVR2,
    BEiT3ForPretraining,
    BEiT3ForVQA,
    VisualTokenizer,
    caption_mask,
    upcycle,
)
from mm_moe.model.embed import VisionEmbedding
from mm_moe.model.heads import normalized_pixel_target, patchify
from mm_moe.moe.layers import MoELayer
from mm_moe.placement import moe_layer_ids

DENSE = FFNConfig(kind="dense", hidden=64, subln=True)
MOES = {
    "smoe": FFNConfig(kind="smoe", hidden=32, num_experts=4, top_k=2, subln=True),
    "mhmoe": FFNConfig(kind="mhmoe", hidden=16, num_experts=4, top_k=2, heads=4),
    "cartesian": FFNConfig(kind="cartesian", hidden=16, num_experts=4, top_k=2, num_shared_experts=1,
                           renormalize=True, activation="swiglu", bias=False),
}


def tiny(moe: str | None = "mhmoe", **kw) -> BEiT3Config:
    return BEiT3Config(img_size=16, patch_size=8, vocab_size=50, max_text_len=12, d_model=32, depth=2, heads=4,
                       ffn=DENSE, moe=MOES[moe] if moe else None, moe_layers="all" if moe else "none", **kw)


def batch(b: int = 2, length: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 16, 16, generator=g)
    ids = torch.randint(1, 50, (b, length), generator=g)
    padding = torch.zeros(b, length, dtype=torch.bool)
    padding[-1, length - 2:] = True
    return images, ids, padding


@pytest.mark.parametrize("moe", [None, *MOES])
def test_padded_batch_equals_unpadded(moe):
    torch.manual_seed(0)
    model = BEiT3(tiny(moe)).eval()
    images, ids, _ = batch(1, 4)
    alone = model(images, ids).hidden
    padded_ids = torch.cat([ids, torch.randint(1, 50, (1, 3))], dim=1)
    padding = torch.tensor([[False] * 4 + [True] * 3])
    padded = model(images, padded_ids, padding).hidden
    torch.testing.assert_close(padded[:, :alone.shape[1]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe", [None, "cartesian"])
def test_captioning_mask_hides_later_tokens(moe):
    torch.manual_seed(0)
    model = BEiT3ForCaptioning(tiny(moe)).eval()
    images, ids, _ = batch(1, 6)
    base = model(images, ids).logits
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 50
    out = model(images, changed).logits
    torch.testing.assert_close(out[:, :3], base[:, :3], atol=1e-6, rtol=1e-6)  # earlier tokens cannot see token 3
    assert not torch.allclose(out[:, 3:], base[:, 3:])  # token 3 and later do


def test_image_tokens_ignore_text_under_caption_mask():
    torch.manual_seed(0)
    model = BEiT3(tiny(None)).eval()
    images, ids, _ = batch(1, 5)
    mask = caption_mask(5, 5)
    a = model(images, ids, attn_mask=mask).hidden[:, :5]
    b = model(images, torch.randint(1, 50, (1, 5)), attn_mask=mask).hidden[:, :5]
    torch.testing.assert_close(a, b)


def test_vqa_gradient_reaches_exactly_the_parameters_it_uses():
    torch.manual_seed(0)
    model = BEiT3ForVQA(tiny(None), num_answers=7)
    images, ids, padding = batch(4, 6)
    model(images, ids, padding, torch.rand(4, 7)).loss.backward()
    # VQA reads the pooled [CLS] only: in the last block, the text tokens' queries, attention output and FFN
    # (and the final text norm) cannot reach it; the mask token is used by MIM only
    last = f"beit3.encoder.blocks.{model.beit3.cfg.depth - 1}."
    unused = (last + "attn.q.l.", last + "attn.inner_norm.l.", last + "attn.out.l.", last + "ffn_norm.l.", last + "ffn.l.",
              "beit3.encoder.norm.l.", "beit3.vision.mask_token")
    without_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert without_grad == {n for n, _ in model.named_parameters() if n.startswith(unused)}


@pytest.mark.parametrize("moe", [None, *MOES])
def test_pretraining_gradient_reaches_every_parameter(moe):
    torch.manual_seed(0)
    model = BEiT3ForPretraining(tiny(moe))
    images, ids, padding = batch(2, 6)
    patch_mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    out = model(images, ids, padding, patch_mask, labels)
    assert set(out.losses) == {"mlm", "mim"}
    out.loss.backward()
    # MLM and MIM read every text and patch token: every parameter gets a gradient
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert model.mlm.embedding is model.beit3.text.tokens  # tied


def test_aux_losses_reach_the_total_loss():
    torch.manual_seed(0)
    model = BEiT3ForNLVR2(tiny("smoe"))
    images, ids, padding = batch(2, 6)
    out = model(images, images.flip(0), ids, padding, torch.tensor([0, 1]), stats=True)
    assert len(out.stats) == 4  # 2 blocks x (V, L)
    # the encoder's aux loss is the sum of what each MoE layer returns (seen by forward hooks on a second forward)
    returned = []
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.register_forward_hook(lambda mod, args, output: returned.append(output.aux_loss))
    again = model(images, images.flip(0), ids, padding, torch.tensor([0, 1]))
    assert len(returned) == 4
    torch.testing.assert_close(again.aux_loss, sum(returned))
    torch.testing.assert_close(out.aux_loss, again.aux_loss)
    torch.testing.assert_close(out.loss, out.losses["nlvr2"] + out.aux_loss)
    assert out.aux_loss > 0
    # the router gradient includes the balance loss: it differs from the task loss' alone
    out.loss.backward(retain_graph=True)
    with_aux = model.beit3.encoder.blocks[0].ffn.v.router.proj.weight.grad.clone()
    model.zero_grad()
    out.losses["nlvr2"].backward()
    assert not torch.allclose(with_aux, model.beit3.encoder.blocks[0].ffn.v.router.proj.weight.grad)


def test_stats_are_fresh_for_each_forward():
    model = BEiT3(tiny("smoe")).eval()
    images, ids, padding = batch()
    assert model(images, ids, padding).stats == {}  # only when asked for
    assert set(model(images, ids, padding, stats=True).stats) == {"blocks.0.ffn.v", "blocks.0.ffn.l", "blocks.1.ffn.v",
                                                                 "blocks.1.ffn.l"}
    text_only = model(text_ids=ids, text_padding=padding, stats=True)
    assert set(text_only.stats) == {"blocks.0.ffn.l", "blocks.1.ffn.l"}
    assert int(text_only.stats["blocks.0.ffn.l"].num_tokens) == int((~padding).sum())


def test_moe_placement_and_shared_branches():
    assert moe_layer_ids(12, "all") == set(range(12))
    assert moe_layer_ids(12, "every_other") == {1, 3, 5, 7, 9, 11}
    assert moe_layer_ids(12, "every_other_even") == {0, 2, 4, 6, 8, 10}  # the CartesianMoE code's GShard formation
    assert moe_layer_ids(12, "top3") == {9, 10, 11}
    assert moe_layer_ids(12, "0, 5,11") == {0, 5, 11}
    for bad in ("top13", "1,12", "1,1", "1,x", "odd"):
        with pytest.raises(ValueError, match="moe_layers"):
            moe_layer_ids(12, bad)
    model = BEiT3(dataclasses.replace(tiny("smoe"), depth=4, moe_layers="every_other", moe_shared_branches=True))
    kinds = [(type(b.ffn.v).__name__, b.ffn.shared) for b in model.encoder.blocks]
    assert kinds == [("DenseFFN", False), ("SparseMoE", True), ("DenseFFN", False), ("SparseMoE", True)]
    even = BEiT3(dataclasses.replace(tiny("smoe"), depth=4, moe_layers="every_other_even"))
    assert [type(b.ffn.v).__name__ for b in even.encoder.blocks] == ["SparseMoE", "DenseFFN", "SparseMoE", "DenseFFN"]
    images, ids, padding = batch()
    out = model(images, ids, padding, stats=True)
    # a shared MoE routes vision and text tokens together: 2 x (5 + 6) + ... minus padding
    assert int(out.stats["blocks.1.ffn.v"].num_tokens) == 2 * 5 + int((~padding).sum())


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = tiny("cartesian")
    model = BEiT3ForVQA(cfg, 5)
    ckpt = BEiT3ForVQA(dataclasses.replace(cfg, grad_checkpointing=True), 5)
    ckpt.load_state_dict(model.state_dict())
    images, ids, padding = batch()
    targets = torch.rand(2, 5)
    for m in (model, ckpt):
        m(images, ids, padding, targets).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=lambda s, name=name: f"{name}: {s}")


def test_drop_path_and_layer_scale():
    torch.manual_seed(0)
    model = BEiT3(tiny(None, drop_path=0.5, layer_scale=0.1))
    images, ids, padding = batch()
    model.eval()
    a, b = model(images, ids, padding).hidden, model(images, ids, padding).hidden
    torch.testing.assert_close(a, b)  # no drop path at eval
    model.train()
    assert not torch.allclose(model(images, ids, padding).hidden, a)
    assert model.encoder.blocks[0].ls_attn.gamma.eq(0.1).all()


@pytest.mark.parametrize("shared", [False, True])
def test_upcycled_smoe_renormalized_reproduces_dense(shared):
    """Identical expert copies whose top-k weights sum to 1 (k > 1; renormalising is a no-op at k = 1) give the
    dense FFN's output."""
    torch.manual_seed(0)
    dense = BEiT3(tiny(None)).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moe = FFNConfig(kind="smoe", hidden=64, num_experts=4, top_k=2, renormalize=True, subln=True)
    sparse = upcycle(dense, moe, "all", moe_shared_branches=shared)[0].eval()
    assert all(isinstance(b.ffn.v, MoELayer) for b in sparse.encoder.blocks)
    images, ids, padding = batch()
    cases = [dict(images=images)]
    if not shared:  # a shared MoE starts from the V branch's FFN, so only vision tokens match the dense model
        cases += [dict(text_ids=ids, text_padding=padding), dict(images=images, text_ids=ids, text_padding=padding)]
    for kwargs in cases:
        real = slice(None) if "text_padding" not in kwargs else ~torch.cat(
            [torch.zeros(2, 5 if "images" in kwargs else 0, dtype=torch.bool), padding], dim=1)
        # padding tokens are not dispatched to experts, so only real tokens must match
        torch.testing.assert_close(sparse(**kwargs).hidden[real], dense(**kwargs).hidden[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mhmoe", "cartesian"])
def test_upcycled_mhmoe_and_cartesian_train(kind):
    torch.manual_seed(0)
    dense = BEiT3(dataclasses.replace(tiny(None), ffn=FFNConfig(kind="dense", hidden=64, subln=kind == "mhmoe",
                                                                activation="gelu" if kind == "mhmoe" else "swiglu",
                                                                bias=kind == "mhmoe")))
    moe = dataclasses.replace(MOES[kind], subln=kind == "mhmoe")
    sparse, _ = upcycle(dense, moe, "every_other")
    model = BEiT3ForVQA(sparse.cfg, 4)
    model.beit3.load_state_dict(sparse.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, ids, padding = batch(4, 6)
    targets = torch.eye(4)
    losses = []
    for _ in range(15):
        out = model(images, ids, padding, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.losses["vqa"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_upcycle_rejects_mismatched_expert_size():
    dense = BEiT3(tiny(None))
    with pytest.raises(ValueError, match="expert hidden"):
        upcycle(dense, FFNConfig(kind="smoe", hidden=32, num_experts=2, subln=True), "all")


def test_mim_targets_and_visual_tokenizer(tmp_path):
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    p = patchify(images, 8)
    assert p.shape == (2, 4, 192)
    # patch 1 of image 0 is rows 0-7, columns 8-15; first value is channel 0 at (0, 8)
    assert p[0, 1, 0] == images[0, 0, 0, 8] and p[0, 1, 1] == images[0, 1, 0, 8]
    t = normalized_pixel_target(images, 8)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), atol=1e-4, rtol=0)

    class Tok(torch.nn.Module):  # a stand-in tokenizer: the id is the patch's brightest channel
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            return x.reshape(b, 3, 2, 8, 2, 8).mean((3, 5)).argmax(1).reshape(b, 4)

    path = tmp_path / "tok.pt2"
    torch.export.save(torch.export.export(Tok(), (torch.randn(2, 3, 16, 16),)), str(path))
    model = BEiT3ForPretraining(tiny(None), tokenizer=VisualTokenizer(path, codebook_size=3))
    out = model(images=torch.randn(2, 3, 16, 16), patch_mask=torch.tensor([[True, True, False, False]] * 2))
    assert set(out.losses) == {"mim"} and out.loss.requires_grad
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VisualTokenizer(tmp_path / "missing.pt2", 3)


def test_size_configs_load():
    """Each modality's path through the encoder has exactly the parameters of a sub-LN ViT of that size."""
    for size, (d, f, depth) in {"base": (768, 3072, 12), "large": (1024, 4096, 24)}.items():
        with torch.device("meta"):
            model = BEiT3(load_config(BEiT3Config, f"configs/model/{size}.yaml"))
        one_way = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.") and ".l." not in n)
        per_block = 4 * (d * d + d) + 2 * d + 2 * 2 * d + (2 * d * f + f + d) + 2 * f  # attn, sub-LN, 2 LNs, FFN, sub-LN
        assert one_way == depth * per_block + 2 * d
    tiny_model = BEiT3(load_config(BEiT3Config, "configs/model/tiny.yaml"))
    assert [type(b.ffn.v).__name__ for b in tiny_model.encoder.blocks] == ["DenseFFN", "MHMoE", "DenseFFN", "MHMoE"]


def test_ffn_norms_use_the_model_eps():
    """Every LayerNorm inside the FFNs (dense and shared sub-LN, expert sub-LN, CartesianMoE group norms) takes
    the model's eps, as the official CartesianMoE code's `mlp_layernorm` takes rms_norm_eps."""
    moe = FFNConfig(kind="cartesian", hidden=16, num_experts=4, top_k=2, num_shared_experts=1, subln=True)
    model = BEiT3(dataclasses.replace(tiny(None), ffn=FFNConfig(kind="dense", hidden=32, subln=True), moe=moe,
                                      moe_layers="every_other", eps=1e-6))
    dense, cart = model.encoder.blocks[0].ffn.v, model.encoder.blocks[1].ffn.v
    assert dense.sub_norm.eps == 1e-6
    for group in (cart.group_a, cart.group_b):
        assert group.norm.eps == group.shared.sub_norm.eps == group.experts.eps == 1e-6


def test_conv_stem_tokens_follow_the_patch_grid():
    """Token i of the convolutional stem is patch i in PatchEmbed's row-major order: shifting the image one patch
    down and right moves every token whose receptive field (15 px) stays inside the image by one row and column."""
    torch.manual_seed(0)
    stem = VisionEmbedding(64, 8, 3, 32, stem="conv").eval().patch_embed
    image = torch.zeros(1, 3, 64, 64)
    image[..., 16:40, 16:40] = torch.randn(1, 3, 24, 24)
    shifted = torch.roll(image, shifts=(8, 8), dims=(2, 3))
    tokens, moved = (stem(x).view(8, 8, 32) for x in (image, shifted))
    torch.testing.assert_close(moved[2:, 2:], tokens[1:7, 1:7])
    assert not torch.allclose(moved[2:, 2:], tokens[2:, 2:])


def test_conv_stem_hides_masked_pixels():
    """With a patch mask, no token sees the masked patches' pixels (the conv receptive fields overlap, so without
    the mask a change there reaches the neighbours); masked tokens become the mask token."""
    torch.manual_seed(0)
    emb = VisionEmbedding(64, 8, 3, 32, stem="conv").eval()
    image = torch.randn(1, 3, 64, 64)
    changed = image.clone()
    changed[..., 16:24, 24:32] += 3.0  # patch (2, 3) = token 19
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 19] = True
    torch.testing.assert_close(emb(changed, mask), emb(image, mask), atol=0, rtol=0)
    torch.testing.assert_close(emb(image, mask)[0, 1 + 19], (emb.mask_token + emb.pos_embed[:, 1 + 19])[0, 0])
    leaked = (emb(changed) - emb(image)).abs().amax(-1)[0, 1:].view(8, 8)
    assert leaked[3, 3] > 0 and leaked[2, 4] > 0  # without the mask, tokens below and right see the change


def test_conv_stem_needs_a_power_of_two_patch():
    with pytest.raises(ConfigError, match="vision_stem=conv expects a power of two >= 2, got 14"):
        load_config(BEiT3Config, None, ["vision_stem=conv", "patch_size=14"])
    model = BEiT3ForPretraining(tiny("mhmoe", vision_stem="conv"))
    images, ids, padding = batch(2, 6)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    model(images, ids, padding, torch.tensor([[True, False, True, False]] * 2), labels).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "patch_embed" in n)
