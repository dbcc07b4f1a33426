"""Every config of a run, as typed dataclasses: one docstring line per field, bounds as `Range` annotations,
and the checks across fields. `mm_moe.config_files` loads them from YAML and overrides.

The bottom layer of the package (it imports no torch): the MoE library, the model, the data pipelines and
the trainer all read their settings from here.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Annotated, Literal

from mm_moe.errors import ConfigError
from mm_moe.placement import moe_layer_ids

FFNKind = Literal["dense", "smoe", "xmoe", "mhmoe", "cartesian"]
Activation = Literal["gelu", "swiglu"]
RouterKind = Literal["linear", "xmoe"]
DispatchMode = Literal["auto", "grouped_mm", "loop"]
Task = Literal["pretrain", "vqa", "nlvr2", "caption"]


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, attached with `Annotated[int, Range(ge=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violated(self, value: float) -> str | None:
        """A description of the bound `value` breaks, or None."""
        for bound, name, holds in ((self.ge, ">=", operator.ge), (self.gt, ">", operator.gt),
                                   (self.le, "<=", operator.le), (self.lt, "<", operator.lt)):
            if bound is not None and not holds(value, bound):
                return f"{name} {bound:g}"
        return None


Positive = Range(gt=0)
NonNegative = Range(ge=0)
Fraction = Range(ge=0, le=1)
PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, NonNegative]
PosFloat = Annotated[float, Positive]


# --- the MoE library and the model ------------------------------------------------------------------------
@dataclass
class FFNConfig:
    """One feed-forward layer: dense, or one of the MoE variants built by `build_ffn`.

    For "cartesian", `num_experts`, `top_k` and `num_shared_experts` apply to each of the two sub-expert
    groups A and B.
    """

    kind: FFNKind = "dense"
    """dense | smoe (top-k, optional shared experts) | xmoe | mhmoe | cartesian."""
    hidden: PosInt = 3072
    """Inner size of the dense FFN, or of each (sub-)expert for MoE kinds."""
    activation: Activation = "gelu"
    """gelu, or swiglu (a third, gate projection)."""
    bias: bool = True
    """Biases in the FFN projections."""
    subln: bool = False
    """A LayerNorm over the hidden units before the output projection (torchscale's sub-LN)."""
    num_experts: PosInt = 8
    """Routed experts (per group for cartesian)."""
    top_k: PosInt = 2
    """Experts each token (sub-token) is sent to."""
    num_shared_experts: NonNegInt = 0
    """Always-on experts beside the routed ones."""
    shared_hidden: PosInt | None = None
    """Inner size of a shared expert (default: `hidden`)."""
    shared_scale: PosFloat = 1.0
    """Factor on the shared experts' output: 0.5 is the CartesianMoE code's fine-grained baseline, whose shared
    expert is 0.5 x (mlp0 + mlp1) over two half-size FFNs (ours: one FFN of their joint width, whose output is
    mlp0 + mlp1)."""
    shared_gate: bool = True
    """Mix routed and shared outputs by a 2-way softmax gate on the token (the CartesianMoE code's SMoE-Share and
    CartesianMoE groups); False adds the shared output (DeepSeekMoE). CartesianMoE groups always gate."""
    heads: PosInt = 1
    """MH-MoE heads: sub-tokens per token."""
    router: RouterKind | None = None
    """linear or xmoe; default: xmoe for xmoe/mhmoe (as the official code), linear otherwise."""
    router_dim: PosInt = 16
    """X-MoE router's low-dimensional routing space."""
    renormalize: bool = False
    """Renormalise the top-k weights to sum to 1 (only for top_k > 1, as the CartesianMoE code: at k = 1 every
    weight would be p / p = 1 and the router would get no gradient from the task)."""
    balance_coef: Annotated[float, NonNegative] = 0.01
    """Weight of the Switch load-balance loss."""
    global_balance: bool = False
    """Balance loss over the global batch (Qwen): top-1 counts summed over data-parallel ranks, and over the step's
    earlier micro-batches, before f is taken; P stays each rank's own."""
    bias_update_rate: Annotated[float, NonNegative] = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for top-k selection only,
    moved by this rate x sign(mean load - load) after every optimizer step (0: off; DeepSeek-V3 used 0.001)."""
    z_loss_coef: Annotated[float, NonNegative] = 0.0
    """Weight of the router z-loss."""
    capacity_factor: PosFloat | None = None
    """None: dropless; else each expert takes at most ceil(capacity_factor * k * T / E) assignments."""
    capacity_mode: Literal["factor", "official"] = "factor"
    """official: each expert takes at most k * ceil(T / E) assignments, as the MH-MoE code (its Tutel path), in
    training and evaluation, whatever capacity_factor; factor: capacity_factor's rule (or dropless)."""
    init: Literal["torch", "official"] = "torch"
    """official: every weight of the layer (projections, experts, router, coefficient gate) from N(0, 0.02) and
    every bias zero, as the CartesianMoE code; torch: torch's default (uniform by fan-in) initialisation."""
    dispatch: DispatchMode = "auto"
    """Expert matmuls: torch._grouped_mm where it applies (auto), always, or one mm per expert."""
    recompute: bool = True
    """Experts keep only their input and first projections for backward and recompute the rest (bias, activation,
    sub-LN): 2-3x less activation memory; off keeps every intermediate, faster where elementwise work dominates
    (at the tiny demo width, where a training step is 12-14% faster without it)."""

    def __post_init__(self) -> None:
        if self.kind != "dense" and not self.top_k <= self.num_experts:
            raise ConfigError(f"top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")

    @property
    def router_kind(self) -> RouterKind:
        """The router actually used: explicit `router`, else X-MoE style for xmoe/mhmoe (as in the official code)."""
        if self.router is not None:
            return self.router
        return "xmoe" if self.kind in ("xmoe", "mhmoe") else "linear"


@dataclass
class BEiT3Config:
    """Model shape; the defaults are BEiT-3 base (12 x 768, 12 heads, FFN 3072, 224px / 16)."""

    img_size: PosInt = 224
    """Input image side in pixels."""
    patch_size: PosInt = 16
    """Patch side in pixels."""
    vision_stem: Literal["patch", "conv"] = "patch"
    """patch: one linear map per patch (BEiT-3); conv: log2(patch_size) stride-2 3x3 convolutions (Xiao et al. 2021),
    which learn shapes from few images faster (easy-VQA); released BEiT-3 weights need patch."""
    in_chans: PosInt = 3
    """Image channels."""
    vocab_size: PosInt = 30522
    """Text embedding rows (the tokenizer's vocabulary, plus at most 128 unused rows)."""
    tokenizer: str = "bert-base-uncased"
    """bert-base-uncased (the packaged WordPiece), a SentencePiece model file (BEiT-3's beit3.spm), or a
    tokenizer folder; a run saves it as run_dir/tokenizer/."""
    max_text_len: PosInt = 64
    """Text positions."""
    d_model: PosInt = 768
    """Hidden size."""
    depth: PosInt = 12
    """Blocks."""
    heads: PosInt = 12
    """Attention heads."""
    ffn: FFNConfig = field(default_factory=lambda: FFNConfig(kind="dense", hidden=3072, subln=True))
    """The FFN of the layers without MoE."""
    moe: FFNConfig | None = None
    """The FFN of the MoE layers (None: a dense model)."""
    moe_layers: str = "none"
    """none | all | every_other (1, 3, ...) | every_other_even (0, 2, ...) | top<N> | indices "1,4,7"."""
    moe_shared_branches: bool = False
    """One MoE for both modalities instead of a V and an L MoE."""
    subln: bool = True
    """Sub-LN inside attention (torchscale)."""
    drop_path: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Stochastic depth of the last block (linear from 0 at the first)."""
    layer_scale: PosFloat | None = None
    """Initial value of the per-channel residual scales (None: no layer scale)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward."""
    eps: PosFloat = 1e-5
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ConfigError(f"heads: expected a divisor of d_model={self.d_model}, got {self.heads}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"patch_size: expected a divisor of img_size={self.img_size}, got {self.patch_size}")
        if self.vision_stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"patch_size: vision_stem=conv expects a power of two >= 2, got {self.patch_size}")
        moe_layer_ids(self.depth, self.moe_layers)
        if self.moe is not None and self.moe.kind == "mhmoe" and self.d_model % self.moe.heads:
            raise ConfigError(f"moe.heads: expected a divisor of d_model={self.d_model} (MH-MoE sub-tokens are "
                              f"d_model / heads wide), got {self.moe.heads}")


# --- training -----------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """AdamW with layer-wise lr decay, linear warmup then cosine."""

    lr: PosFloat = 1e-3
    """Peak learning rate."""
    min_lr_ratio: Annotated[float, Fraction] = 0.01
    """The cosine decays to lr * min_lr_ratio."""
    weight_decay: Annotated[float, NonNegative] = 0.05
    """AdamW weight decay (not on biases, norms, embeddings)."""
    layer_decay: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Per-layer lr decay; 1.0: off (BEiT-3 fine-tuning uses 0.65-0.9)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: PosFloat = 1e-6
    """AdamW epsilon."""
    warmup_steps: NonNegInt = 100
    """Linear warmup steps."""
    clip_grad: PosFloat | None = 3.0
    """Gradient norm clip (None: off)."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: PosInt = 1000
    """Optimizer steps."""
    batch_size: PosInt = 32
    """Samples per process and micro-step."""
    grad_accum: PosInt = 1
    """Micro-steps per optimizer step."""
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    """auto: bf16 on a CUDA device that supports it, else fp32."""
    log_every: PosInt = 10
    """Steps between metrics.jsonl records."""
    ckpt_every: PosInt = 500
    """Steps between checkpoints (the last step is always saved)."""
    async_checkpoint: bool = False
    """Write checkpoints in the background (DCP async_save): the step loop waits only for the copy of the state to
    host memory; the manifest and the folder's rename follow when the write completes."""
    export_every: PosInt | None = None
    """Steps between checkpoints that also hold the full model.safetensors, gathered to rank 0 while training waits
    (None: every checkpoint; the last step's always does). `mm-moe-export` writes it for any other checkpoint."""
    eval_every: PosInt | None = None
    """Steps between validations of a fine-tuning task with validation data (the last step is always validated);
    the best score's weights are kept in run_dir/best/."""
    keep_last: PosInt = 2
    """Checkpoints kept."""
    ema_decay: Annotated[float, Range(gt=0, lt=1)] | None = None
    """EMA of the weights (None: off)."""
    seed: NonNegInt = 0
    """Seed of weights, data order, augmentation and masks."""
    num_workers: NonNegInt = 0
    """DataLoader worker processes."""
    distributed: Literal["none", "ddp", "fsdp2"] = "ddp"
    """Wrapping under torchrun."""
    expert_parallel: bool = False
    """Shard MoE experts over the ranks (all_to_all dispatch)."""
    tensorboard: bool = False
    """Also log to run_dir/tensorboard."""
    dist_timeout_s: PosInt = 300
    """Seconds a torch.distributed collective may wait for the other ranks before the run stops with an error
    (a frozen or dead rank)."""
    compile: bool = False
    """torch.compile every encoder block (regional, fullgraph; `mm_moe.engine.compile_blocks`)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend: inductor (fused kernels), aot_eager (traced forward and backward, run by eager
    kernels: the graph without the compile time, for checks), eager (dynamo only)."""


@dataclass
class ObjectivesConfig:
    """Weights of the pretraining losses (0 skips a pass)."""

    mlm: Annotated[float, NonNegative] = 1.0
    """Masked language modeling, text only."""
    mim: Annotated[float, NonNegative] = 1.0
    """Masked image modeling, image only."""
    vlm: Annotated[float, NonNegative] = 1.0
    """Masked vision-language modeling: masked text given the image."""


@dataclass
class PretrainDataConfig:
    """Webdataset shards of image-text pairs and how they are masked."""

    shards: str = ""
    """Brace pattern or directory of .tar shards."""
    mlm_prob: Annotated[float, Range(gt=0, le=1)] = 0.15
    """Share of text tokens masked in the text-only (MLM) pass (BEiT-3: 15% of monomodal text)."""
    vlm_prob: Annotated[float, Range(gt=0, le=1)] = 0.5
    """Share of text tokens masked in the image-text (VLM) pass, drawn independently of the MLM pass's masks
    (BEiT-3: 50% of the text of image-text pairs)."""
    mask_ratio: Annotated[float, Range(gt=0, le=1)] = 0.4
    """Share of patches masked by block masking."""
    min_block: PosInt = 16
    """Smallest masked block in patches (BEiT: 16 of 196)."""
    shuffle_buffer: NonNegInt = 1000
    """Local shards: consecutive positions of the epoch's sample order permuted together; remote shards: samples in
    webdataset's shuffle buffer."""
    epoch_batches: PosInt | None = None
    """Remote (streamed) shards only: resample them, this many batches per epoch and rank."""
    image_shards: str = ""
    """Local shards of images alone (no caption needed) mixed into the masked-image (MIM) pass, as BEiT-3 pretrains
    on monomodal images beside the pairs (empty: the pairs' images only)."""
    text_shards: str = ""
    """Local shards of texts alone (.txt) mixed into the text-only (MLM) pass, as BEiT-3's monomodal text (empty:
    the pairs' captions only)."""
    monomodal_share: Annotated[float, Range(ge=0, le=1)] = 0.5
    """Share of the MIM pass's images and of the MLM pass's texts taken from image_shards / text_shards (when
    given) instead of the pairs: the last share x batch_size (rounded half up) of every micro-batch."""


@dataclass
class TaskDataConfig:
    """Fine-tuning data in the official formats."""

    vqa_train_questions: str | tuple[str, ...] = ""
    """VQA v2 questions json(s) of the training split(s) (a list for train + val, as BEiT-3's recipe)."""
    vqa_train_annotations: str | tuple[str, ...] = ""
    """VQA v2 annotations json(s), in the order of vqa_train_questions; the answer vocabulary comes from all."""
    vqa_val_questions: str = ""
    """VQA v2 questions json scored after training (empty: no scoring)."""
    vqa_val_annotations: str = ""
    """VQA v2 annotations json of that split."""
    vqa_images: str = ""
    """Folder of the COCO images (searched recursively)."""
    answer_min_count: PosInt = 9
    """Answers occurring at least this often in training form the vocabulary."""
    train_crop_scale: Annotated[float, Range(gt=0, le=1)] = 0.8
    """Smallest area share of the training images' random resized crop; 1 turns the crop off (a plain resize, for
    data such as easy-VQA whose small shapes at the border a crop would cut out, leaving wrong answers)."""
    train_dihedral: bool = False
    """Also flip and turn training images by quarter turns at random (the square's 8 symmetries): only for data
    whose answers do not depend on orientation (easy-VQA); it would break left/right questions."""
    nlvr2_train: str = ""
    """NLVR2 train.json (JSON Lines)."""
    nlvr2_dev: str = ""
    """NLVR2 dev.json scored after training (empty: no scoring)."""
    nlvr2_images: str = ""
    """Folder of the NLVR2 images."""
    karpathy: str = ""
    """COCO Karpathy dataset_coco.json."""
    coco_images: str = ""
    """Folder of the COCO images."""
    caption_mask_prob: Annotated[float, Range(gt=0, le=1)] = 0.6
    """Share of caption tokens masked in captioning fine-tuning (BEiT-3)."""
    caption_val_split: str = "val"
    """Karpathy split captioned and scored in validation (empty: no scoring)."""
    caption_beam: PosInt = 3
    """Beam size of caption validation."""
    caption_val_meteor: bool = True
    """Score METEOR in validation too (a java process answering image by image: ~8 s per 100 images on CPU);
    eval_caption.py always scores it."""


@dataclass
class RunConfig:
    """Everything one `train_mm.py` run needs; saved as run_dir/config.yaml and in every checkpoint."""

    model: BEiT3Config = field(default_factory=BEiT3Config)
    """The model (a section, or the path of a YAML file)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    """Pretraining loss weights."""
    pretrain_data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    """Pretraining shards."""
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    """Fine-tuning files."""
    task: Task = "pretrain"
    """pretrain | vqa | nlvr2 | caption (set by train_mm.py)."""
    run_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl and checkpoints go."""

    def __post_init__(self) -> None:
        if self.task == "pretrain" and not any(dataclasses.astuple(self.objectives)):
            raise ConfigError("objectives: every weight is 0 (mlm, mim, vlm); pretraining needs at least one above 0")


__all__ = [
    "Range", "FFNConfig", "BEiT3Config", "OptimConfig", "TrainConfig", "ObjectivesConfig",
    "PretrainDataConfig", "TaskDataConfig", "RunConfig",
]
