"""BEiT3: embeddings + Multiway encoder; torchscale weight conversion; sparse upcycling of dense checkpoints."""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor, nn

from mm_moe.config import BEiT3Config, FFNConfig
from mm_moe.model.embed import TextEmbedding, VisionEmbedding
from mm_moe.model.encoder import Encoder, EncoderOutput, KVCache
from mm_moe.moe.layers import CartesianMoE, DenseFFN, MHMoE, SparseMoE


def beit3_group_matcher(prefix: str) -> dict:
    """timm group matcher for a BEiT3 under `prefix` (e.g. "beit3."): embeddings, blocks 0..L-1, the final norm,
    then everything outside the encoder (task heads): layer ids 0, 1..L, L+1 as in unilm's BEiT-3 fine-tuning."""
    p = re.escape(prefix)
    return {"stem": rf"^{p}(?:vision|text)\.",
            "blocks": [(rf"^{p}encoder\.blocks\.(\d+)\.", None), (rf"^{p}encoder\.norm\.", (99998,)),
                       (rf"^(?!{p})", (99999,))]}


def caption_mask(num_image: int, num_text: int, device: torch.device | None = None) -> Tensor:
    """Bool[N, N], True = may attend: image tokens see the image only; text sees the image and earlier text."""
    n = num_image + num_text
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:, :num_image] = True
    mask[num_image:, num_image:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return mask


class BEiT3(nn.Module):
    """The shared multimodal encoder: image, text, or image-text input -> EncoderOutput."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEmbedding(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.d_model, cfg.vision_stem)
        self.text = TextEmbedding(cfg.vocab_size, cfg.max_text_len, cfg.d_model)
        self.encoder = Encoder(cfg.d_model, cfg.depth, cfg.heads, cfg.ffn, cfg.moe, moe_layers=cfg.moe_layers,
                               moe_shared_branches=cfg.moe_shared_branches, subln=cfg.subln, drop_path=cfg.drop_path,
                               layer_scale=cfg.layer_scale, grad_checkpointing=cfg.grad_checkpointing, eps=cfg.eps)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides norms and biases (embeddings, tokens)."""
        return {"vision.cls_token", "vision.mask_token", "vision.pos_embed", "text.pos_embed", "text.tokens.weight"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style layer groups for layer-wise LR decay: embeddings, one group per block, then the rest."""
        return beit3_group_matcher("")

    def embed(self, images: Tensor | None, text_ids: Tensor | None, text_padding: Tensor | None,
              patch_mask: Tensor | None) -> tuple[Tensor, int, Tensor | None]:
        """Embeddings [B, N, d] of [vision | text], the split index, and the padding mask Bool[B, N] (or None)."""
        if images is None and text_ids is None:
            raise ValueError("BEiT3.forward needs images, text_ids or both")
        parts = []
        if images is not None:
            parts.append(self.vision(images, patch_mask))
        split = parts[0].shape[1] if parts else 0
        padding = None
        if text_ids is not None:
            parts.append(self.text(text_ids))
            if text_padding is not None:
                if text_padding.shape != text_ids.shape:
                    raise ValueError(f"text_padding shape {tuple(text_padding.shape)} must equal text_ids shape "
                                     f"{tuple(text_ids.shape)}")
                padding = torch.cat([text_padding.new_zeros(text_ids.shape[0], split), text_padding], dim=1)
        x = torch.cat(parts, dim=1)
        if padding is not None:
            x = x * (~padding).unsqueeze(-1).to(x.dtype)  # as torchscale: padded embeddings are zeroed
        return x, split, padding

    def forward(self, images: Tensor | None = None, text_ids: Tensor | None = None, text_padding: Tensor | None = None,
                patch_mask: Tensor | None = None, attn_mask: Tensor | None = None, stats: bool = False) -> EncoderOutput:
        """images[B, C, H, W] and/or text_ids Long[B, L]; text_padding Bool[B, L] (True: pad);
        patch_mask Bool[B, num_patches] (True: masked patch); attn_mask Bool[N, N] (True: may attend);
        stats: also return the routing statistics of every MoE layer."""
        x, split, padding = self.embed(images, text_ids, text_padding, patch_mask)
        mask = None
        if padding is not None:
            mask = (~padding)[:, None, None, :]  # [B, 1, 1, N] keys that may be attended
        if attn_mask is not None:
            mask = attn_mask[None, None] if mask is None else mask & attn_mask[None, None]
        return self.encoder(x, split, mask, padding, stats=stats)

    def encode_image(self, images: Tensor) -> KVCache:
        """Encode images alone and keep every block's keys/values of their tokens. Under the captioning mask image
        tokens attend only to the image, so text decoded afterwards (`decode_step`) reuses them unchanged."""
        x = self.vision(images)
        cache = KVCache(self.cfg.depth)
        self.encoder(x, x.shape[1], cache=cache)
        return cache

    def decode_step(self, text_ids: Tensor, positions: Tensor, cache: KVCache, attn_mask: Tensor, keep: int) -> Tensor:
        """Hidden states [B, n, d] of n new text tokens at `positions` that attend to the cached tokens and to each
        other as attn_mask Bool[n, cached + n] allows (True: may attend); the first `keep` join the cache."""
        cache.keep = keep
        return self.encoder(self.text(text_ids, positions=positions), 0, attn_mask[None, None], cache=cache).hidden

    @classmethod
    def from_torchscale(cls, state_dict: dict[str, Tensor], cfg: BEiT3Config) -> BEiT3:
        """A dense BEiT3 with the weights of a torchscale `BEiT3` (optionally under unilm's `beit3.` prefix).

        Task-head keys of unilm checkpoints are ignored; any other unconverted or missing key is an error.
        """
        if cfg.vision_stem != "patch":
            raise ValueError(f"from_torchscale: released BEiT-3 weights have a patch stem; got vision_stem={cfg.vision_stem!r}")
        model = cls(cfg)
        converted = convert_torchscale_state_dict(state_dict)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise KeyError(f"from_torchscale: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        return model


_TORCHSCALE_RULES = [
    (r"^text_embed\.weight$", "text.tokens.weight"),
    (r"^vision_embed\.proj\.(weight|bias)$", r"vision.patch_embed.proj.\1"),
    (r"^vision_embed\.(cls_token|mask_token)$", r"vision.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv]|out)_proj\.A\.", r"encoder.blocks.\1.attn.\2.v."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv]|out)_proj\.B\.", r"encoder.blocks.\1.attn.\2.l."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.inner_attn_ln\.A\.", r"encoder.blocks.\1.attn.inner_norm.v."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.inner_attn_ln\.B\.", r"encoder.blocks.\1.attn.inner_norm.l."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.A\.", r"encoder.blocks.\1.attn_norm.v."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.B\.", r"encoder.blocks.\1.attn_norm.l."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.A\.", r"encoder.blocks.\1.ffn_norm.v."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.B\.", r"encoder.blocks.\1.ffn_norm.l."),
    (r"^encoder\.layers\.(\d+)\.ffn\.A\.ffn_layernorm\.", r"encoder.blocks.\1.ffn.v.sub_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn\.B\.ffn_layernorm\.", r"encoder.blocks.\1.ffn.l.sub_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn\.A\.(fc[12])\.", r"encoder.blocks.\1.ffn.v.\2."),
    (r"^encoder\.layers\.(\d+)\.ffn\.B\.(fc[12])\.", r"encoder.blocks.\1.ffn.l.\2."),
    (r"^encoder\.layer_norm\.A\.", "encoder.norm.v."),
    (r"^encoder\.layer_norm\.B\.", "encoder.norm.l."),
]


def convert_torchscale_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchscale BEiT3 keys -> ours. Position tables drop fairseq's 2 leading unused rows."""
    prefix = "beit3." if any(k.startswith("beit3.") for k in state_dict) else ""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # unilm task heads (pooler, head, ...)
        key = key[len(prefix):]
        if key == "encoder.embed_positions.A.weight":
            out["vision.pos_embed"] = value[2:].unsqueeze(0)
            continue
        if key == "encoder.embed_positions.B.weight":
            out["text.pos_embed"] = value[2:].unsqueeze(0)
            continue
        for pattern, repl in _TORCHSCALE_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"from_torchscale: no rule for key {prefix}{key!r}")
    return out


def upcycle(dense: BEiT3, moe: FFNConfig, moe_layers: str,
            moe_shared_branches: bool = False) -> tuple[BEiT3, dict[str, list[str]]]:
    """Sparse upcycling: a MoE BEiT3 whose non-FFN weights are the dense model's and whose experts start from
    the dense FFN of their block (the V branch's when the MoE is shared by both modalities).

    SMoE / X-MoE: every expert is a copy (top-k > 1 with renormalisation then reproduces the dense model exactly).
    MH-MoE: identity head/merge, expert e takes sub-token chunk e mod h of the dense FFN and a cyclic slice of
    its hidden units. CartesianMoE: group A's (sub-)experts take the first half of the dense hidden units,
    group B's the second half (shared sub-experts likewise). Routers, gates and the other MoE parameters are
    freshly initialised. Returns the model and the parameter names by origin: "kept" (the dense model's, same
    name), "copied" (whole dense FFN weights per expert), "sliced" (parts of them), "identity", "new".
    """
    cfg = dataclasses.replace(dense.cfg, moe=moe, moe_layers=moe_layers, moe_shared_branches=moe_shared_branches)
    model = BEiT3(cfg)
    dense_state = dense.state_dict()
    kept = {k: v for k, v in dense_state.items() if k in model.state_dict()}
    model.load_state_dict(kept, strict=False)  # everything but the MoE FFNs
    report: dict[str, list[str]] = {"kept": sorted(kept), "copied": [], "sliced": [], "identity": [], "new": []}
    names = {id(m): n for n, m in model.named_modules()}
    for block, dense_block in zip(model.encoder.blocks, dense.encoder.blocks, strict=True):
        pairs = [(block.ffn.v, dense_block.ffn.v)]
        if not block.ffn.shared:
            pairs.append((block.ffn.l, dense_block.ffn.l))
        for layer, src in pairs:
            if isinstance(layer, DenseFFN):
                continue
            origin = _init_from_dense(layer, src)
            for name, _ in layer.named_parameters():
                report[origin.get(name, "new")].append(f"{names[id(layer)]}.{name}")
    return model, report
def _check_compatible(src: DenseFFN, experts, what: str) -> None:
    if (src.gate is None) != (experts.w3 is None) or (src.fc1.bias is None) != (experts.b1 is None) \
            or (src.sub_norm is None) != (experts.norm_w is None):
        raise ValueError(f"upcycle: {what} experts must match the dense FFN's activation, bias and subln settings")


@torch.no_grad()
def _copy_expert(experts, e: int, src: DenseFFN, rows: Tensor, cols: Tensor) -> None:
    """Expert e <- the dense FFN restricted to input/output dims `cols` and hidden units `rows`."""
    experts.w1[e].copy_(src.fc1.weight[rows][:, cols].t())
    experts.w2[e].copy_(src.fc2.weight[cols][:, rows].t())
    if experts.w3 is not None:
        experts.w3[e].copy_(src.gate.weight[rows][:, cols].t())
    if experts.b1 is not None:
        experts.b1[e].copy_(src.fc1.bias[rows])
        experts.b2[e].copy_(src.fc2.bias[cols])
        if experts.b3 is not None:
            experts.b3[e].copy_(src.gate.bias[rows])
    if experts.norm_w is not None:
        experts.norm_w[e].copy_(src.sub_norm.weight[rows])
        experts.norm_b[e].copy_(src.sub_norm.bias[rows])


@torch.no_grad()
def _slice_dense(dst: DenseFFN, src: DenseFFN, rows: Tensor) -> None:
    """dst <- src restricted to hidden units `rows` (same settings otherwise)."""
    for name in ("fc1", "gate"):
        if getattr(dst, name) is not None:
            getattr(dst, name).weight.copy_(getattr(src, name).weight[rows])
            if getattr(dst, name).bias is not None:
                getattr(dst, name).bias.copy_(getattr(src, name).bias[rows])
    dst.fc2.weight.copy_(src.fc2.weight[:, rows])
    if dst.fc2.bias is not None:
        dst.fc2.bias.copy_(src.fc2.bias)
    if dst.sub_norm is not None:
        dst.sub_norm.weight.copy_(src.sub_norm.weight[rows])
        dst.sub_norm.bias.copy_(src.sub_norm.bias[rows])


@torch.no_grad()
def _init_from_dense(layer: nn.Module, src: DenseFFN) -> dict[str, str]:
    """Initialise a MoE layer from a dense FFN; returns {parameter name: "copied" | "sliced" | "identity"} for the
    parameters it set (the others keep their fresh initialisation)."""
    d, hidden = src.fc1.in_features, src.fc1.out_features
    if isinstance(layer, SparseMoE):
        experts = layer.experts
        _check_compatible(src, experts, "SparseMoE")
        if experts.d_hidden != hidden:
            raise ValueError(f"upcycle: SparseMoE expert hidden {experts.d_hidden} must equal the dense FFN's {hidden}")
        for e in range(experts.num_experts):
            _copy_expert(experts, e, src, torch.arange(hidden), torch.arange(d))
        return {f"experts.{n}": "copied" for n, _ in experts.named_parameters()}
    if isinstance(layer, MHMoE):
        experts, h, ds = layer.experts, layer.heads, layer.d_sub
        _check_compatible(src, experts, "MHMoE")
        layer.head.weight.copy_(torch.eye(d))
        layer.head.bias.zero_()
        layer.merge.weight.copy_(torch.eye(d))
        layer.merge.bias.zero_()
        for e in range(experts.num_experts):
            rows = (torch.arange(experts.d_hidden) + (e // h) * experts.d_hidden) % hidden
            _copy_expert(experts, e, src, rows, torch.arange((e % h) * ds, (e % h + 1) * ds))
        return {**{f"{m}.{p}": "identity" for m in ("head", "merge") for p in ("weight", "bias")},
                **{f"experts.{n}": "sliced" for n, _ in experts.named_parameters()}}
    if isinstance(layer, CartesianMoE):
        origin = {}
        for half, (gname, group) in enumerate((("group_a", layer.group_a), ("group_b", layer.group_b))):
            experts = group.experts
            _check_compatible(src, experts, "CartesianMoE")
            rows = (torch.arange(experts.d_hidden) + half * (hidden // 2)) % hidden
            for e in range(experts.num_experts):
                _copy_expert(experts, e, src, rows, torch.arange(d))
            origin.update({f"{gname}.experts.{n}": "sliced" for n, _ in experts.named_parameters()})
            if group.shared is not None:
                _slice_dense(group.shared, src, (torch.arange(group.shared.fc1.out_features) + half * (hidden // 2)) % hidden)
                origin.update({f"{gname}.shared.{n}": "sliced" for n, _ in group.shared.named_parameters()})
        return origin
    raise TypeError(f"upcycle: no rule for {type(layer).__name__}")
