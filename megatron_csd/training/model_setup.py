"""Resolve the student / teacher ModelConfigs, check them against the tokenizer, build the stage.

Vocabulary rules (checked at start-up, before any model is built):

- the data tokenizer is THE tokenizer: a checkpoint directory that carries tokenizer files must
  hold the same tokenizer (fingerprint), else ValueError;
- every model must embed all tokenizer ids: ``model.vocab_size >= tokenizer.vocab_size``, and
  not be vastly larger (more than one padding block of 1024 extra rows means another
  tokenizer family, e.g. a Gemma model with a LLaMA tokenizer);
- the loss uses the tokenizer's vocabulary as the real vocabulary (columns at or past it are
  padding for every statistic);
- student and teacher logits must be sharded identically, so both are built with the larger
  of their padded widths (``models.checkpoint.load_model`` re-pads a checkpoint on load).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_csd.training.config import ModelRef, TrainConfig

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_MAX_EXTRA_VOCAB = 1024


@dataclass
class ModelPlan:
    student: object                 # ModelConfig
    teacher: Optional[object]       # ModelConfig or None (sft)
    vocab_size: int                 # real vocabulary for the loss (= tokenizer's)


def _checkpoint_tokenizer(directory: str):
    from megatron_csd.data import load_tokenizer

    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return load_tokenizer(os.path.join(directory, name))
    return None


def resolve_model_config(ref: ModelRef, role: str, tokenizer):
    """ModelConfig for a preset (vocab from the tokenizer, overrides applied) or a checkpoint."""
    from megatron_csd.models import ModelConfig, get_preset

    if ref.preset is not None:
        cfg = get_preset(ref.preset)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(ref.overrides) - known)
        if unknown:
            raise ValueError(f"{role} overrides {unknown} are not ModelConfig fields; allowed: {sorted(known)}")
        changes = dict(ref.overrides)
        changes.setdefault("vocab_size", tokenizer.vocab_size)
        return cfg.replace(**changes)
    from megatron_csd.models.checkpoint import load_model_config

    if not os.path.isdir(ref.checkpoint):
        raise ValueError(f"{role} checkpoint {ref.checkpoint!r} is not a directory (expected "
                         "model_config.json + model/ from the conversion tool or a training run)")
    cfg = load_model_config(ref.checkpoint)
    own = _checkpoint_tokenizer(ref.checkpoint)
    if own is not None and own.fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f"the {role} checkpoint {ref.checkpoint} ships a different tokenizer than "
            f"data.tokenizer ({own.vocab_size} vs {tokenizer.vocab_size} ids, fingerprints "
            f"{own.fingerprint[:12]} vs {tokenizer.fingerprint[:12]}): teacher, student and data "
            "must share one tokenizer")
    return cfg


def _check_vocab(cfg, role: str, tokenizer) -> None:
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the {role} embeds {cfg.vocab_size} tokens but the tokenizer has "
                         f"{tokenizer.vocab_size}: wrong tokenizer or wrong model")
    if cfg.vocab_size - tokenizer.vocab_size > _MAX_EXTRA_VOCAB:
        raise ValueError(f"the {role} vocabulary ({cfg.vocab_size}) is much larger than the "
                         f"tokenizer's ({tokenizer.vocab_size}): the model was trained with "
                         "another tokenizer; use the model's own tokenizer")


def plan_models(config: TrainConfig, tokenizer) -> ModelPlan:
    student = resolve_model_config(config.student, "student", tokenizer)
    _check_vocab(student, "student", tokenizer)
    teacher = None
    if config.distill:
        teacher = resolve_model_config(config.teacher, "teacher", tokenizer)
        _check_vocab(teacher, "teacher", tokenizer)
        if teacher.padded_vocab_size != student.padded_vocab_size:
            # Logits must be sharded identically; models.checkpoint.load_model re-pads on load.
            common = max(teacher.padded_vocab_size, student.padded_vocab_size)
            student = student.replace(padded_vocab_size=common)
            teacher = teacher.replace(padded_vocab_size=common)
    return ModelPlan(student=student, teacher=teacher, vocab_size=tokenizer.vocab_size)


def params_dtype_for(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_models(config: TrainConfig, plan: ModelPlan, *, pre_process: bool, post_process: bool,
                 params_dtype: torch.dtype):
    """(student, teacher or None) GPTModels of this pipeline stage, weights loaded, teacher frozen."""
    from megatron_csd.models import build_gpt_model, freeze_teacher

    sequence_parallel = config.parallel.sequence_parallel
    student = build_gpt_model(plan.student, pre_process=pre_process, post_process=post_process,
                              params_dtype=params_dtype, sequence_parallel=sequence_parallel)
    if config.student.checkpoint is not None and config.checkpoint.load is None:
        from megatron_csd.models.checkpoint import load_model

        load_model(student, config.student.checkpoint,
                   verify=not config.checkpoint.no_verify_checkpoint)
    teacher = None
    if plan.teacher is not None:
        teacher = build_gpt_model(plan.teacher, pre_process=pre_process, post_process=post_process,
                                  params_dtype=params_dtype, fp8=config.fp8_teacher,
                                  sequence_parallel=sequence_parallel)
        if config.teacher.checkpoint is not None:
            from megatron_csd.models.checkpoint import load_model

            load_model(teacher, config.teacher.checkpoint,
                       verify=not config.checkpoint.no_verify_checkpoint)
        else:
            warnings.warn("the teacher is a randomly initialised preset: fine for tests, "
                          "meaningless for distillation (give teacher.checkpoint)")
        freeze_teacher(teacher)
    return student, teacher
