"""Shared builders for the training tests (this module holds no tests).

A workspace is toy instruction data (train/valid JSONL + a sentencepiece tokenizer from
``megatron_csd.data.toy``), prepared once at seq length 32, plus model-only checkpoints of a
tiny Gemma teacher (hidden 64) and a smaller tiny Gemma student (hidden 32) written at TP1/PP1,
so that every layout under test starts from the same weights. ``tiny_config`` runs are unpacked
(``training.packing: false``, one sample per row) so that their expectations stay per sample;
the packing tests ask for packing themselves.
"""
from __future__ import annotations

import os
from pathlib import Path

SEQ_LENGTH = 32
STUDENT_OVERRIDES = {"hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2,
                     "kv_channels": 16}


def build_workspace(root: str, *, num_train: int = 64, num_valid: int = 16) -> dict:
    """Toy data + prepared splits under ``root``; returns the paths (no model checkpoints)."""
    from megatron_csd.data import load_tokenizer, prepare_dataset
    from megatron_csd.data.toy import build_toy_data

    root = Path(root)
    paths = build_toy_data(root / "toy", num_train=num_train, num_valid=num_valid, vocab_size=512)
    tokenizer = load_tokenizer(paths["tokenizer"])
    prepare_dataset(paths["train"], tokenizer, root / "prepared", seq_length=SEQ_LENGTH,
                    template="dolly", valid_input=paths["valid"])
    return {"root": str(root), "tokenizer": str(paths["tokenizer"]),
            "train": str(root / "prepared" / "train"), "valid": str(root / "prepared" / "valid"),
            "train_jsonl": str(paths["train"]), "valid_jsonl": str(paths["valid"]),
            "teacher": str(root / "teacher"), "student": str(root / "student")}


def save_initial_models(workspace: dict) -> None:
    """Write the teacher/student checkpoints (call inside an initialised 1-process world)."""
    import shutil

    from megatron_csd.data import load_tokenizer
    from megatron_csd.models import build_gpt_model, get_preset
    from megatron_csd.models.checkpoint import save_model
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel

    tokenizer = load_tokenizer(workspace["tokenizer"])
    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=7)
    teacher_cfg = get_preset("tiny-gemma").replace(vocab_size=tokenizer.vocab_size)
    student_cfg = teacher_cfg.replace(**STUDENT_OVERRIDES)
    for cfg, directory in ((teacher_cfg, workspace["teacher"]), (student_cfg, workspace["student"])):
        model = build_gpt_model(cfg)
        save_model(model, directory, cfg)
        shutil.copy(workspace["tokenizer"], os.path.join(directory, "tokenizer.model"))
    destroy_parallel()


def tiny_config(workspace: dict, output_dir: str, *, tp: int = 1, pp: int = 1, mode: str = "distill",
                train_iters: int = 3, global_batch_size: int = 4, micro_batch_size: int = 1,
                **sections):
    """A TrainConfig over the workspace; ``sections`` update config sections (dicts)."""
    from megatron_csd.training.config_io import config_from_dict

    tree = {
        "mode": mode, "device": "cpu", "precision": "fp32",
        "student": {"checkpoint": workspace["student"]},
        "teacher": {"checkpoint": workspace["teacher"]} if mode == "distill" else {},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "optimizer": {"lr": 3e-3, "lr_warmup_iters": 1, "clip_grad": 1.0, "weight_decay": 0.01},
        "training": {"train_iters": train_iters, "global_batch_size": global_batch_size,
                     "micro_batch_size": micro_batch_size, "seq_length": SEQ_LENGTH, "seed": 11,
                     "eval_samples": 8, "packing": False},  # one sample per row (packing tests: True)
        "data": {"train_path": workspace["train"], "valid_path": workspace["valid"],
                 "tokenizer": workspace["tokenizer"]},
        "checkpoint": {"save": os.path.join(output_dir, "checkpoints")},
        "logging": {"output_dir": output_dir, "quiet": True},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)
