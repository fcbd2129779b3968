"""Resolve the student / teacher ModelConfigs, check them against the tokenizer, build the stage.

Vocabulary rules (checked at start-up, before any model is built):

- the data tokenizer is THE tokenizer: a checkpoint directory that carries tokenizer files must
  hold the same tokenizer (fingerprint), else ValueError;
- the distribution every loss, the CE and the evaluation work on is the MODEL's vocabulary:
  ``ModelConfig.vocab_size`` = the embedding rows (an HF checkpoint's config ``vocab_size``,
  recorded at conversion and carried by trainer checkpoints). Only Megatron's own padding
  (columns ``>= vocab_size`` up to ``padded_vocab_size``) is masked. Rows past the tokenizer's
  ids are real columns: the teacher gives them (small) probability and the student must learn
  to match it, else sampling from the exported student emits ids the tokenizer cannot decode;
- teacher and student must have the same model vocabulary (columns are compared one by one);
- every model must embed all tokenizer ids (``tokenizer.vocab_size <= model.vocab_size``);
  fewer ids than rows is normal (Qwen2.5: 151936 rows for ~151665 ids). There is no upper
  bound on the surplus: real models pad their embeddings to arbitrary multiples, and a wrong
  tokenizer family is caught by the fingerprint check above when the checkpoint carries its
  tokenizer; a tokenizer covering less than half of the rows only warns (it cannot block);
- a preset (random init) has no vocabulary of its own: it takes the vocabulary of the run's
  checkpoint model when the other model is one (so teacher and student match), else the
  tokenizer's size; ``overrides: {vocab_size: N}`` sets it explicitly;
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
# Below this share of the model rows covered by tokenizer ids, warn (likely another tokenizer).
_MIN_TOKENIZER_COVERAGE = 0.5


@dataclass
class ModelPlan:
    student: object                 # ModelConfig
    teacher: Optional[object]       # ModelConfig or None (sft)
    vocab_size: int                 # the models' vocabulary (embedding rows): the loss columns


def _checkpoint_tokenizer(directory: str):
    from megatron_csd.data import load_tokenizer

    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return load_tokenizer(os.path.join(directory, name))
    return None


def resolve_model_config(ref: ModelRef, role: str, tokenizer, preset_vocab_size: Optional[int] = None):
    """ModelConfig for a preset (overrides applied; vocabulary ``preset_vocab_size``, default the
    tokenizer's, unless overridden) or a checkpoint (its own recorded vocabulary)."""
    from megatron_csd.models import ModelConfig, get_preset

    if ref.preset is not None:
        cfg = get_preset(ref.preset)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(ref.overrides) - known)
        if unknown:
            raise ValueError(f"{role} overrides {unknown} are not ModelConfig fields; allowed: {sorted(known)}")
        changes = dict(ref.overrides)
        changes.setdefault("vocab_size", preset_vocab_size or tokenizer.vocab_size)
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
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the {role} model has only "
                         f"{cfg.vocab_size} vocabulary rows (vocab_size), so ids >= {cfg.vocab_size} "
                         "cannot be embedded: use the model's own tokenizer")
    if tokenizer.vocab_size < _MIN_TOKENIZER_COVERAGE * cfg.vocab_size:
        warnings.warn(f"the tokenizer's {tokenizer.vocab_size} ids cover less than half of the {role} "
                      f"model's {cfg.vocab_size} vocabulary rows: is it the model's own tokenizer?")


def plan_models(config: TrainConfig, tokenizer) -> ModelPlan:
    refs = {"student": config.student}
    if config.distill:
        refs["teacher"] = config.teacher
    # Checkpoints first: a preset takes the vocabulary of the run's checkpoint model, if any.
    configs = {role: resolve_model_config(ref, role, tokenizer)
               for role, ref in refs.items() if ref.preset is None}
    checkpoint_vocab = next((cfg.vocab_size for cfg in configs.values()), None)
    for role, ref in refs.items():
        if ref.preset is not None:
            configs[role] = resolve_model_config(ref, role, tokenizer, checkpoint_vocab)
        _check_vocab(configs[role], role, tokenizer)
    student, teacher = configs["student"], configs.get("teacher")
    if teacher is not None:
        if teacher.vocab_size != student.vocab_size:
            raise ValueError(
                f"teacher and student vocabularies differ: the teacher has {teacher.vocab_size} "
                f"rows (vocab_size), the student {student.vocab_size}; distillation compares them "
                "column by column, so use a student with the teacher's vocab_size (a preset "
                "student takes it unless student.overrides sets vocab_size)")
        if teacher.padded_vocab_size != student.padded_vocab_size:
            # Logits must be sharded identically; models.checkpoint.load_model re-pads on load.
            common = max(teacher.padded_vocab_size, student.padded_vocab_size)
            student = student.replace(padded_vocab_size=common)
            teacher = teacher.replace(padded_vocab_size=common)
    return ModelPlan(student=student, teacher=teacher, vocab_size=student.vocab_size)


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
    from megatron_csd.training.packing_setup import packing_enabled

    if packing_enabled(config):
        from megatron_csd.models.packed_attention import enable_packing

        for model in (student, teacher):
            if model is not None:  # refuses layer specs that cannot isolate samples
                enable_packing(model, micro_batch_size=config.training.micro_batch_size)
    return student, teacher
