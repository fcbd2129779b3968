"""The training configuration: one typed dataclass tree, validated on construction.

    TrainConfig
      mode          "distill" (teacher + student, distillation loss) | "sft" (student only, CE)
      device        "cpu" | "cuda" | "auto" (cuda when available)
      precision     "fp32" | "bf16" | "fp16" | "auto" (bf16 on cuda, fp32 on cpu)
      fp8_teacher   None | "hybrid" | "e4m3" (transformer-engine on a GPU only)
      student, teacher : ModelRef     preset name or model-only checkpoint dir (+ overrides)
      loss          : LossSection     LossConfig fields + kd_ratio
      parallel      : ParallelConfig  TP, PP (DP = world / (TP * PP)), sequence parallel
      optimizer     : OptimizerConfig AdamW, lr schedule with warmup, grad clipping
      training      : TrainingConfig  iterations, batch sizes, sequence length, seed, eval
      data          : DataConfig      train / valid JSONL and tokenizer
      checkpoint    : CheckpointConfig save dir / interval, load dir
      logging       : LoggingConfig   output dir, log interval, TensorBoard
      on_policy     : OnPolicyConfig  student/teacher-generated responses (on_policy_config.py)
      eval_generate : EvalGenerateConfig  sampled-answer evaluation every N steps (eval_generate_config.py)

Every field is a plain JSON/YAML value, so ``asdict(config)`` is the resolved config that is
written beside the run (``config.yaml``). Loading and command-line overrides live in
``config_io.py``; checks that need the world size (DP) run in :func:`check_world_size`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_csd.training.eval_generate_config import EvalGenerateConfig
from megatron_csd.training.on_policy_config import OnPolicyConfig

MODES = ("distill", "sft")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
FP8_FORMATS = ("hybrid", "e4m3")
LR_DECAY_STYLES = ("cosine", "linear", "constant")


def _flag(name: str, help_text: str, **extra) -> dict:
    """Field metadata: the command-line flag and its help line (see config_io)."""
    return {"flag": name, "help": help_text, **extra}


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value, *, minimum: float | None = None,
                 maximum: float | None = None, strict_min: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict_min else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


@dataclass
class ModelRef:
    """Where a model comes from: a preset (random init) or a model-only checkpoint directory.

    ``overrides`` replaces ModelConfig fields of a preset (e.g. a smaller tiny student); a
    preset's vocab_size defaults to the other model's when that is a checkpoint, else to the
    tokenizer's size (``training.model_setup``).
    """

    preset: Optional[str] = None
    checkpoint: Optional[str] = None
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preset is not None and self.checkpoint is not None:
            raise ValueError(
                f"give a model either a preset ({self.preset!r}) or a checkpoint "
                f"({self.checkpoint!r}), not both")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a mapping of ModelConfig fields, got {self.overrides!r}")
        if self.checkpoint is not None and self.overrides:
            raise ValueError("overrides apply to presets only; a checkpoint carries its own "
                             f"model_config.json (got overrides {sorted(self.overrides)})")

    @property
    def is_set(self) -> bool:
        return self.preset is not None or self.checkpoint is not None

    def describe(self) -> str:
        return f"preset {self.preset}" if self.preset else f"checkpoint {self.checkpoint}"


@dataclass
class LossSection:
    """Distillation objective (``megatron_csd.losses.LossConfig`` fields) plus the CE mix.

    The training loss per response token is ``kd_ratio * distill + (1 - kd_ratio) * CE``
    (DistiLLM's convention: 1.0 = pure distillation, the paper's setting). Ignored in SFT mode.
    """

    objective: str = field(default="csd", metadata=_flag("--objective", "csd|fkl|rkl|jsd|tvd|skl|srkl|dld"))
    weights: str = field(default="SS", metadata=_flag("--csd-weights", "CSD weighting, e.g. SS, TS, MM"))
    temperature: float = field(default=1.0, metadata=_flag("--temperature", "softmax temperature"))
    mix: float = field(default=0.15, metadata=_flag("--csd-mix", "a of the M weighting"))
    scale: float = field(default=1.0, metadata=_flag("--csd-scale", "loss scale for csd / dld"))
    skew: float = field(default=0.1, metadata=_flag("--skew", "skew of skl / srkl"))
    beta: float = field(default=0.5, metadata=_flag("--jsd-beta", "beta of jsd"))
    kd_ratio: float = field(default=1.0, metadata=_flag("--kd-ratio", "weight of the distillation term; 1 - kd_ratio weights CE"))
    fused_output_loss: bool = field(default=True, metadata=_flag(
        "--fused-output-loss", "fuse the output layer with the loss over token chunks (no full logits); "
        "false = the unfused path"))

    def __post_init__(self):
        _check_float("loss.kd_ratio", self.kd_ratio, minimum=0.0, maximum=1.0)
        if not isinstance(self.fused_output_loss, bool):
            raise TypeError(f"loss.fused_output_loss must be true/false, got {self.fused_output_loss!r}")

    def loss_config(self):
        """The validated ``LossConfig`` for ``distillation_loss`` (raises on bad fields)."""
        from megatron_csd.losses import LossConfig

        return LossConfig(objective=self.objective, weights=self.weights,
                          temperature=self.temperature, mix=self.mix, scale=self.scale,
                          skew=self.skew, beta=self.beta)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field(default=1, metadata=_flag("--tensor-model-parallel-size", "TP size"))
    pipeline_model_parallel_size: int = field(default=1, metadata=_flag("--pipeline-model-parallel-size", "PP size"))
    sequence_parallel: bool = field(default=False, metadata=_flag("--sequence-parallel", "Megatron sequence parallelism (TP > 1)"))
    virtual_pipeline_model_parallel_size: Optional[int] = field(
        default=None, metadata=_flag("--virtual-pipeline-model-parallel-size", "interleaved schedule (not supported)"))

    def __post_init__(self):
        _check_int("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size, minimum=1)
        _check_int("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size, minimum=1)
        if not isinstance(self.sequence_parallel, bool):
            raise TypeError(f"parallel.sequence_parallel must be true/false, got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1 "
                             "(it shards activations over the TP group)")
        if self.virtual_pipeline_model_parallel_size is not None:
            raise ValueError(
                "the interleaved pipeline schedule (virtual_pipeline_model_parallel_size) is not "
                "supported: teacher and student hidden states travel together through the "
                "non-interleaved 1F1B schedule. Leave it unset and use "
                "pipeline_model_parallel_size alone.")


@dataclass
class OptimizerConfig:
    lr: float = field(default=1e-4, metadata=_flag("--lr", "peak learning rate"))
    min_lr: float = field(default=0.0, metadata=_flag("--min-lr", "final learning rate"))
    lr_decay_style: str = field(default="cosine", metadata=_flag("--lr-decay-style", "cosine|linear|constant"))
    lr_warmup_iters: int = field(default=0, metadata=_flag("--lr-warmup-iters", "linear warmup iterations"))
    lr_decay_iters: Optional[int] = field(default=None, metadata=_flag("--lr-decay-iters", "decay length (default train_iters)"))
    weight_decay: float = field(default=0.01, metadata=_flag("--weight-decay", "AdamW weight decay"))
    adam_beta1: float = field(default=0.9, metadata=_flag("--adam-beta1", "Adam beta1"))
    adam_beta2: float = field(default=0.999, metadata=_flag("--adam-beta2", "Adam beta2"))
    adam_eps: float = field(default=1e-8, metadata=_flag("--adam-eps", "Adam epsilon"))
    clip_grad: float = field(default=1.0, metadata=_flag("--clip-grad", "global grad-norm clip (0 = off)"))
    use_distributed_optimizer: Optional[bool] = field(
        default=None, metadata=_flag("--use-distributed-optimizer", "shard optimizer state over DP (default: on cuda)"))

    def __post_init__(self):
        _check_float("optimizer.lr", self.lr, minimum=0.0, strict_min=True)
        _check_float("optimizer.min_lr", self.min_lr, minimum=0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr ({self.min_lr}) is larger than optimizer.lr ({self.lr})")
        _check_choice("optimizer.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        _check_int("optimizer.lr_warmup_iters", self.lr_warmup_iters, minimum=0)
        if self.lr_decay_iters is not None:
            _check_int("optimizer.lr_decay_iters", self.lr_decay_iters, minimum=1)
        _check_float("optimizer.weight_decay", self.weight_decay, minimum=0.0)
        _check_float("optimizer.adam_beta1", self.adam_beta1, minimum=0.0, maximum=0.999999)
        _check_float("optimizer.adam_beta2", self.adam_beta2, minimum=0.0, maximum=0.999999999)
        _check_float("optimizer.adam_eps", self.adam_eps, minimum=0.0, strict_min=True)
        _check_float("optimizer.clip_grad", self.clip_grad, minimum=0.0)


@dataclass
class TrainingConfig:
    train_iters: int = field(default=100, metadata=_flag("--train-iters", "optimizer steps"))
    micro_batch_size: int = field(default=1, metadata=_flag("--micro-batch-size", "sequences per microbatch"))
    global_batch_size: int = field(default=8, metadata=_flag("--global-batch-size", "sequences per step (all DP ranks)"))
    seq_length: int = field(default=512, metadata=_flag("--seq-length", "tokens per sequence"))
    seed: int = field(default=1234, metadata=_flag("--seed", "random seed"))
    eval_interval: int = field(default=0, metadata=_flag("--eval-interval", "validate every N steps (0 = start and end only)"))
    eval_samples: int = field(default=0, metadata=_flag("--eval-samples", "held-out samples per evaluation (0 = the whole valid set)"))
    eval_at_start: bool = field(default=True, metadata=_flag("--eval-at-start", "validate before the first step"))
    packing: Union[bool, str] = field(default="auto", metadata=_flag("--packing", "several samples per seq_length row, isolated attention: auto (on where supported, packing_setup.py) | true | false", negative="--no-packing", auto_bool=True))
    divergence_warning_factor: float = field(default=10.0, metadata=_flag("--divergence-warning-factor", "warn when the loss exceeds K x its running median (0 = off)"))

    def __post_init__(self):
        if self.train_iters == 0:
            raise ValueError("training.train_iters (--train-iters / TRAIN_ITERS) is 0: the run would "
                             "train nothing; set the total number of optimizer steps (>= 1)")
        _check_int("training.train_iters", self.train_iters, minimum=1)
        _check_float("training.divergence_warning_factor", self.divergence_warning_factor, minimum=0.0)
        if 0 < self.divergence_warning_factor <= 1:
            raise ValueError(f"training.divergence_warning_factor must be > 1 (or 0 = off), got "
                             f"{self.divergence_warning_factor}")
        _check_int("training.micro_batch_size", self.micro_batch_size, minimum=1)
        _check_int("training.global_batch_size", self.global_batch_size, minimum=1)
        _check_int("training.seq_length", self.seq_length, minimum=2)
        _check_int("training.seed", self.seed, minimum=0)
        _check_int("training.eval_interval", self.eval_interval, minimum=0)
        _check_int("training.eval_samples", self.eval_samples, minimum=0)
        if not (isinstance(self.packing, bool) or self.packing == "auto"):
            raise ValueError(f"training.packing must be auto, true or false, got {self.packing!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"training.micro_batch_size ({self.micro_batch_size})")


@dataclass
class DataConfig:
    train_path: Optional[str] = field(default=None, metadata=_flag("--train-data", "training JSONL or prepared file"))
    valid_path: Optional[str] = field(default=None, metadata=_flag("--valid-data", "held-out JSONL or prepared file"))
    tokenizer: Optional[str] = field(default=None, metadata=_flag("--tokenizer", "tokenizer.model / tokenizer.json (file or dir)"))
    template: Optional[str] = field(default=None, metadata=_flag("--prompt-template", "prompt template for raw JSONL (data package default when unset)"))


@dataclass
class CheckpointConfig:
    save: Optional[str] = field(default=None, metadata=_flag("--save", "checkpoint dir (default OUTPUT_DIR/checkpoints)"))
    save_interval: int = field(default=0, metadata=_flag("--save-interval", "save every N steps (0 = at the end only)"))
    load: Optional[str] = field(default=None, metadata=_flag("--load", "resume from this checkpoint dir (its latest)"))
    save_final: bool = field(default=True, metadata=_flag("--save-final", "save a checkpoint after the last step"))
    overwrite_save: bool = field(default=False, metadata=_flag("--overwrite-save", "train into a save dir that holds another run instead of resuming it (replaces its iter_* of the same iterations only)"))
    no_verify_checkpoint: bool = field(default=False, metadata=_flag("--no-verify-checkpoint", "load checkpoints without checking their manifest.json (sizes, crc32)"))

    def __post_init__(self):
        _check_int("checkpoint.save_interval", self.save_interval, minimum=0)


@dataclass
class LoggingConfig:
    output_dir: str = field(default="runs/distill", metadata=_flag("--output-dir", "metrics.jsonl, config.yaml, tensorboard/"))
    log_interval: int = field(default=1, metadata=_flag("--log-interval", "console/metrics every N steps"))
    tensorboard: bool = field(default=False, metadata=_flag("--tensorboard", "also write TensorBoard events"))
    quiet: bool = field(default=False, metadata=_flag("--quiet", "no console progress lines"))

    def __post_init__(self):
        _check_int("logging.log_interval", self.log_interval, minimum=1)


SECTION_TYPES = {
    "student": ModelRef, "teacher": ModelRef, "loss": LossSection, "parallel": ParallelConfig,
    "optimizer": OptimizerConfig, "training": TrainingConfig, "data": DataConfig,
    "checkpoint": CheckpointConfig, "logging": LoggingConfig, "on_policy": OnPolicyConfig,
    "eval_generate": EvalGenerateConfig,
}


@dataclass
class TrainConfig:
    mode: str = "distill"
    device: str = "auto"
    precision: str = "auto"
    fp8_teacher: Optional[str] = None
    student: ModelRef = field(default_factory=ModelRef)
    teacher: ModelRef = field(default_factory=ModelRef)
    loss: LossSection = field(default_factory=LossSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    eval_generate: EvalGenerateConfig = field(default_factory=EvalGenerateConfig)

    def __post_init__(self):
        for name, section_type in SECTION_TYPES.items():
            if not isinstance(getattr(self, name), section_type):
                raise TypeError(f"{name} must be a {section_type.__name__}, got {type(getattr(self, name)).__name__}")
        _check_choice("mode", self.mode, MODES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.fp8_teacher is not None:
            _check_choice("fp8_teacher", self.fp8_teacher, FP8_FORMATS)
        if not self.student.is_set:
            raise ValueError("no student: set student.preset (e.g. tiny-gemma, gemma-2b) or "
                             "student.checkpoint (a model-only checkpoint directory)")
        if self.mode == "distill":
            if not self.teacher.is_set:
                raise ValueError("mode 'distill' needs a teacher: set teacher.checkpoint (a "
                                 "trained model-only checkpoint) or teacher.preset; use "
                                 "mode 'sft' to fine-tune without a teacher")
            self.loss.loss_config()  # surfaces bad objective / weights / temperature now
        else:
            if self.teacher.is_set:
                raise ValueError(f"mode 'sft' trains without a teacher, but teacher is "
                                 f"{self.teacher.describe()}; remove it or use mode 'distill'")
            if self.fp8_teacher is not None:
                raise ValueError("fp8_teacher is set but mode 'sft' has no teacher")
        self.on_policy.check_mode(self.mode)
        self.on_policy.check_packing(self.training.packing)
        if self.data.train_path is None:
            raise ValueError("data.train_path (--train-data) is required")
        if self.data.tokenizer is None:
            raise ValueError("data.tokenizer (--tokenizer) is required: the teacher and the "
                             "student must share it")
        if self.training.seq_length % self.parallel.tensor_model_parallel_size and self.parallel.sequence_parallel:
            raise ValueError(
                f"sequence parallelism shards the sequence over TP: seq_length "
                f"{self.training.seq_length} must be a multiple of "
                f"tensor_model_parallel_size {self.parallel.tensor_model_parallel_size}")

    @property
    def distill(self) -> bool:
        return self.mode == "distill"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_world_size(config: TrainConfig, world_size: int) -> int:
    """Data-parallel size implied by the world size; raises when the layout does not fit.

    DP = world / (TP * PP); the global batch must split into whole microbatches per DP rank.
    """
    par = config.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {par.tensor_model_parallel_size} x "
            f"{par.pipeline_model_parallel_size}; launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    per_step = config.training.micro_batch_size * dp
    if config.training.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {config.training.global_batch_size} must be a multiple of "
            f"micro_batch_size x data-parallel size = {config.training.micro_batch_size} x {dp}")
    return dp
