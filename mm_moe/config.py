"""Every config of a run, as typed dataclasses, and the machinery that loads them: YAML files, section
includes, `key=value` overrides, and validation of every value against its annotation.

The bottom layer of the package (it imports no torch): the MoE library, the model, the data pipelines and
the trainer all read their settings from here, and a CLI can validate a config before importing torch.

Validation on load: numeric strings (YAML reads `1e-4` as a string) become numbers, a value of the wrong
type or out of its `Range` is rejected with its dotted key path, the expected type and the value given,
and an unknown key is rejected with the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

FFNKind = Literal["dense", "smoe", "xmoe", "mhmoe", "cartesian"]
Activation = Literal["gelu", "swiglu"]
RouterKind = Literal["linear", "xmoe"]
DispatchMode = Literal["auto", "grouped_mm", "loop"]
Task = Literal["pretrain", "vqa", "nlvr2", "caption"]


class InputError(ValueError):
    """Bad input from the user (a file, a field, a key, an argument); the message names it, what was expected and
    what was given. The CLIs print it on one line, without a traceback."""


class RunStopped(RuntimeError):
    """A run that had to stop, for a reason stated in one line (a non-finite loss, a rank that stopped answering);
    the CLIs print it like an InputError."""


def one_line(err: BaseException) -> str:
    """The message of an error on one line; for one re-raised from a DataLoader worker (whose message is the
    worker's traceback), the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def run_reporting(prog: str, work: Callable[[], Any]) -> int:
    """A CLI's work: exit status 0 when done; an InputError or RunStopped is printed as `prog: error: message` on
    one line (no traceback) and gives 1."""
    try:
        work()
    except (InputError, RunStopped) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


class ConfigError(InputError):
    """A config value, key or file that cannot be used; the message names where it came from."""


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
    """None: dropless; else each expert takes at most capacity_factor * k * T / E assignments."""
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


def moe_layer_ids(depth: int, placement: str) -> set[int]:
    """Which layers get MoE FFNs: "none", "all", "every_other" (layers 1, 3, 5, ...: torchscale's moe_freq=2, the
    MH-MoE code), "every_other_even" (0, 2, 4, ...: the CartesianMoE code's GShard formation), "top<N>" (the
    last N), or an explicit comma-separated list of layer indices ("0,5,11")."""
    if placement == "none":
        return set()
    if placement == "all":
        return set(range(depth))
    if placement == "every_other":
        return set(range(1, depth, 2))
    if placement == "every_other_even":
        return set(range(0, depth, 2))
    if placement.startswith("top") and placement[3:].isdigit() and 0 < int(placement[3:]) <= depth:
        return set(range(depth - int(placement[3:]), depth))
    parts = [p.strip() for p in placement.split(",")]
    if all(p.isdigit() for p in parts) and all(int(p) < depth for p in parts) and len(set(parts)) == len(parts):
        return {int(p) for p in parts}
    raise ConfigError(f"moe_layers: expected none, all, every_other, every_other_even, top<N> with N <= depth={depth}, "
                      f"or distinct layer indices below {depth} like '1,3,5', got {placement!r}")


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
        if self.moe is not None and self.moe.kind == "mhmoe" and self.d_model % self.moe.heads:
            raise ConfigError(f"moe.heads: expected a divisor of d_model={self.d_model} (MH-MoE sub-tokens are "
                              f"d_model / heads wide), got {self.moe.heads}")
        moe_layer_ids(self.depth, self.moe_layers)


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
    """Share of text tokens masked."""
    mask_ratio: Annotated[float, Range(gt=0, le=1)] = 0.4
    """Share of patches masked by block masking."""
    min_block: PosInt = 16
    """Smallest masked block in patches (BEiT: 16 of 196)."""
    shuffle_buffer: NonNegInt = 1000
    """Samples in the shuffle buffer."""
    epoch_batches: PosInt | None = None
    """Resample shards, this many batches per epoch and rank (use under DDP)."""


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


# --- loading and validation ---------------------------------------------------------------------------------
T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        ranges = [m for m in meta if isinstance(m, Range)]
        bounds = ", ".join(f"{op} {b:g}" for r in ranges for op, b in
                           ((">=", r.ge), (">", r.gt), ("<=", r.le), ("<", r.lt)) if b is not None)
        return f"{_type_name(base)} {bounds}".strip()
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list of " + ", ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any, kind: type) -> Any:
    """`value` as an int or float when it is one (numbers, numeric strings), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError
    number = float(value) if isinstance(value, str) else value
    if kind is float:
        return float(number)
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError
        return int(number)
    return number


def _mismatch(where: str, tp: Any, value: Any, detail: str = "") -> ConfigError:
    """The error for `value` not fitting annotation `tp` at `where` (marked, so an enclosing union or Annotated
    can restate it with its own, fuller type)."""
    err = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{detail}")
    err.at, err.detail = where, detail
    return err


def _restated(err: ConfigError, where: str, tp: Any, value: Any) -> ConfigError:
    """A mismatch at `where` restated with the fuller type `tp`; an error inside a nested section as it is."""
    return _mismatch(where, tp, value, err.detail) if getattr(err, "at", None) == where else err


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked (and numbers converted) against annotation `tp`; ConfigError naming `where` otherwise."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        try:
            out = _coerce(value, base, where)
        except ConfigError as err:
            raise _restated(err, where, tp, value) from None
        for bound in (m for m in meta if isinstance(m, Range)):
            if (broken := bound.violated(out)) is not None:
                raise _mismatch(where, tp, value, f" (not {broken})")
        return out
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        *first, last = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in first:
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                if getattr(err, "at", None) != where:
                    raise
        try:
            return _coerce(value, last, where)
        except ConfigError as err:
            raise _restated(err, where, tp, value) from None
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _mismatch(where, tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, list | tuple):
                raise _mismatch(where, tp, value)
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise _mismatch(where, tp, value)
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _from_dict(tp, value, where)
        raise _mismatch(where, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(where, tp, value)
    if tp in (int, float):
        try:
            return _number(value, tp)
        except ValueError:
            raise _mismatch(where, tp, value) from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(where, tp, value, " (quote it in YAML)")
    if tp is Any:
        return value
    raise TypeError(f"{where}: no rule to check annotation {tp!r}")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{_join(where, str(key))}: unknown key for {cls.__name__}{hint} (valid: {', '.join(names)})")
    kwargs = {key: _coerce(value, hints[key], _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a check across fields: its message starts with the field's name
        raise ConfigError(_join(where, str(err))) from None


def _join(where: str, key: str) -> str:
    """The dotted path of `key` under `where` ("file.yaml:" is a root)."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def from_dict(cls: type[T], data: Any, where: str = "config:") -> T:
    """Build dataclass `cls` from a nested dict, checking every key and value (ConfigError names the key path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {data!r}")
    return _from_dict(cls, data, where)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, returning a new dict, in order: after
    `model=configs/model/x.yaml`, `model.img_size=480` changes that file's section."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if isinstance(node.get(p), str) and node[p].endswith((".yaml", ".yml")):
                node[p] = read_yaml(node[p])  # a section included from a file (e.g. model=...yaml) takes overrides
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not YAML ({err})") from None
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {data!r}")
    return data


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it, mapping by mapping (a nested key changes only that key, as overrides do)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_includes(cls: type, data: dict[str, Any], where: str = "config:") -> dict[str, Any]:
    """A section given as a path to a YAML file (`model: configs/model/tiny.yaml`) is replaced by its content; a
    section mapping with an `include` key (`model: {include: configs/model/tiny.yaml, vision_stem: conv}`) is that
    file's content with the section's other keys laid over it."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        sub = _dataclass_in(hints[key]) if key in hints else None
        if sub is None:
            continue
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            value = read_yaml(value)
        if isinstance(value, dict) and "include" in value:
            path = value["include"]
            if not (isinstance(path, str) and path.endswith((".yaml", ".yml"))):
                raise ConfigError(f"{_join(where, key)}.include: expected the path of a YAML file, got {path!r}")
            value = _merged(read_yaml(path), {k: v for k, v in value.items() if k != "include"})
        if isinstance(value, dict):
            out[key] = _resolve_includes(sub, value, _join(where, key))
    return out


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside an annotation like `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (optional; sections may name other YAML files) plus `key=value` overrides."""
    where = f"{path or 'config'}:"
    data = _resolve_includes(cls, read_yaml(path), where) if path is not None else {}
    return from_dict(cls, _resolve_includes(cls, apply_overrides(data, overrides or []), where), where=where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a dataclass config (for config.yaml in run and checkpoint folders)."""
    return dataclasses.asdict(cfg)


__all__ = [
    "InputError", "ConfigError", "RunStopped", "one_line", "run_reporting",
    "Range", "FFNConfig", "BEiT3Config", "OptimConfig", "TrainConfig", "ObjectivesConfig",
    "PretrainDataConfig", "TaskDataConfig", "RunConfig", "moe_layer_ids",
    "from_dict", "apply_overrides", "read_yaml", "load_config", "to_dict",
]
