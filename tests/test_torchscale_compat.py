"""Our dense BEiT3 reproduces torchscale's BEiT3 (the official BEiT-3 forward) after weight conversion."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from mm_moe.config import FFNConfig
from mm_moe.config_files import load_config
from mm_moe.model import BEiT3, BEiT3Config, caption_mask

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm.models.layers
    torchscale_beit3 = pytest.importorskip("torchscale.model.BEiT3")
    from torchscale.architecture.config import EncoderConfig


def torchscale_config(**kw) -> EncoderConfig:
    """The settings of unilm beit3's `_get_base_config`, with size overrides."""
    args = dict(multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True)
    return EncoderConfig(**{**args, **kw})


SMALL = dict(img_size=32, patch_size=8, vocab_size=100, encoder_embed_dim=64, encoder_attention_heads=4,
             encoder_ffn_embed_dim=128, encoder_layers=2, max_source_positions=18)


def ours_for(ts: dict) -> BEiT3Config:
    return BEiT3Config(img_size=ts["img_size"], patch_size=ts["patch_size"], vocab_size=ts["vocab_size"],
                       max_text_len=ts["max_source_positions"] - 2, d_model=ts["encoder_embed_dim"],
                       depth=ts["encoder_layers"], heads=ts["encoder_attention_heads"],
                       ffn=FFNConfig(kind="dense", hidden=ts["encoder_ffn_embed_dim"], subln=True))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = torchscale_beit3.BEiT3(torchscale_config(**SMALL)).eval()
    with torch.no_grad():  # make every weight non-trivial (LayerNorms, cls / mask tokens start at 1 / 0)
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = BEiT3.from_torchscale(theirs.state_dict(), ours_for(SMALL)).eval()
    return theirs, ours


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(0, 100, (3, 9), generator=g)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    padding[2, 3:] = True
    return images, ids, padding


def test_image_only(pair):
    theirs, ours = pair
    images, _, _ = inputs()
    patch_mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    ref = theirs(visual_tokens=images, vision_masked_position=patch_mask)["encoder_out"]
    torch.testing.assert_close(ours(images=images, patch_mask=patch_mask).hidden, ref, atol=1e-5, rtol=1e-5)


def test_text_only_with_padding(pair):
    theirs, ours = pair
    _, ids, padding = inputs()
    ref = theirs(textual_tokens=ids, text_padding_position=padding)["encoder_out"]
    torch.testing.assert_close(ours(text_ids=ids, text_padding=padding).hidden, ref, atol=1e-5, rtol=1e-5)


def test_image_text_with_padding(pair):
    theirs, ours = pair
    images, ids, padding = inputs()
    ref = theirs(textual_tokens=ids, visual_tokens=images, text_padding_position=padding)["encoder_out"]
    torch.testing.assert_close(ours(images, ids, padding).hidden, ref, atol=1e-5, rtol=1e-5)


def test_captioning_mask(pair):
    theirs, ours = pair
    images, ids, padding = inputs()
    mask = caption_mask(17, 9)
    ref = theirs(textual_tokens=ids, visual_tokens=images, text_padding_position=padding,
                 attn_mask=(~mask).float())["encoder_out"]  # torchscale: 1 = blocked
    torch.testing.assert_close(ours(images, ids, padding, attn_mask=mask).hidden, ref, atol=1e-5, rtol=1e-5)


def test_unilm_prefix_and_unknown_keys():
    torch.manual_seed(0)
    theirs = torchscale_beit3.BEiT3(torchscale_config(**SMALL))
    sd = {f"beit3.{k}": v for k, v in theirs.state_dict().items()}
    sd["head.weight"] = torch.zeros(3, 64)  # a unilm task head: ignored
    BEiT3.from_torchscale(sd, ours_for(SMALL))
    sd["beit3.encoder.layers.0.something.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="no rule for key"):
        BEiT3.from_torchscale(sd, ours_for(SMALL))
    with pytest.raises(ValueError, match="patch stem; got vision_stem='conv'"):
        BEiT3.from_torchscale(sd, dataclasses.replace(ours_for(SMALL), vision_stem="conv"))


def test_base_parameter_count_equals_torchscale():
    """BEiT-3 base (vocab 64010, 1024 text positions): ours has fairseq's 2 unused rows fewer per position table."""
    base = dict(img_size=224, patch_size=16, vocab_size=64010, encoder_embed_dim=768, encoder_attention_heads=12,
                encoder_ffn_embed_dim=3072, encoder_layers=12, max_source_positions=1024)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in torchscale_beit3.BEiT3(torchscale_config(**base)).parameters())
        cfg = load_config(BEiT3Config, "configs/model/base.yaml", ["vocab_size=64010", "max_text_len=1022"])
        ours = sum(p.numel() for p in BEiT3(cfg).parameters())
    assert ours == theirs - 2 * 2 * 768  # theirs: 220,987,392 (BEiT-3's README says 222M, with task heads)
