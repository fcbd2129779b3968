"""Shared builders for the model-vocabulary tests (this module holds no tests).

Tiny LLaMA-style HF models whose embedding has ``ROWS`` = 192 rows, and an HF ``tokenizer.json``
of ``IDS`` = 184 ids (character BPE trained on the toy instruction data), so rows 184-191 are
real model rows that no token id names (as in Qwen2.5: 151936 rows, ~151665 ids).

The extra rows are given a controlled probability: every token embedding carries a constant
``+2`` on hidden dim 0 and the layers are small, so the final normalised hidden state has a
large positive dim 0; the output rows 184-191 hold ``extra_logit_scale`` on dim 0 (0 elsewhere).
A negative scale makes them "cold" (a teacher trained with CE over all its rows puts ~1e-5
there), a positive one "hot" (a student that puts a large share of its mass there).
"""
from __future__ import annotations

import json
from pathlib import Path

ROWS, IDS = 192, 184
SEQ_LENGTH = 48
TEACHER_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
STUDENT_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)


def build_tokenizer(texts, directory: Path) -> None:
    """An HF tokenizer.json with exactly IDS ids (+ tokenizer_config.json naming the specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=IDS, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    assert tokenizer.get_vocab_size() == IDS, tokenizer.get_vocab_size()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))


def rendered_texts(records) -> list:
    """The dolly-rendered prompt + response of toy records (the tokenizer's training text)."""
    from megatron_csd.data import InstructionRecord, render

    texts = []
    for r in records:
        rendered = render(InstructionRecord(r["instruction"], r["response"], r["context"]), "dolly")
        texts.append(rendered.prompt + rendered.response)
    return texts


def build_workspace(root, *, num_train: int = 48, num_valid: int = 16) -> dict:
    """Toy train/valid JSONL, the 184-id tokenizer, and both splits prepared at SEQ_LENGTH."""
    from megatron_csd.data import load_tokenizer, prepare_dataset
    from megatron_csd.data.toy import generate_records, stratified_split

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train, valid = stratified_split(generate_records(num_train + num_valid, seed=0), num_valid)
    paths = {"root": str(root), "tokenizer_dir": str(root / "tokenizer")}
    for name, records in (("train_jsonl", train), ("valid_jsonl", valid)):
        paths[name] = str(root / f"{name.split('_')[0]}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
    # Trained on both splits: every character of the data is in the alphabet (no <unk>).
    build_tokenizer(rendered_texts(train + valid), root / "tokenizer")
    paths["tokenizer"] = str(root / "tokenizer" / "tokenizer.json")
    prepare_dataset(paths["train_jsonl"], load_tokenizer(paths["tokenizer"]), root / "prepared",
                    seq_length=SEQ_LENGTH, template="dolly", valid_input=paths["valid_jsonl"])
    paths.update(train=str(root / "prepared" / "train"), valid=str(root / "prepared" / "valid"))
    return paths


def build_hf_model(directory, shape: dict, *, extra_logit_scale: float, tokenizer_dir, seed: int):
    """Save a tiny untied LlamaForCausalLM with ROWS rows (+ the tokenizer files) to `directory`."""
    import shutil

    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=ROWS, num_hidden_layers=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=1,
                                      pad_token_id=0, **shape)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        model.model.embed_tokens.weight.normal_(0.0, 0.3, generator=generator)
        model.model.embed_tokens.weight[:, 0] = 2.0
        model.lm_head.weight.normal_(0.0, 0.3, generator=generator)
        model.lm_head.weight[IDS:] = 0.0
        model.lm_head.weight[IDS:, 0] = extra_logit_scale
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, Path(directory) / name)
    return model.eval()


def extra_row_mass(model, dataset) -> float:
    """Mean over response positions of the probability (fp64 softmax over all ROWS columns)
    that an HF causal LM puts on the rows no tokenizer id names (IDS..ROWS-1)."""
    import torch

    from megatron_csd.data import collate

    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.double()
    assert logits.shape[-1] == ROWS
    mass = torch.softmax(logits, dim=-1)[..., IDS:].sum(-1)
    mask = batch["loss_mask"] > 0
    return float(mass[mask].mean())


def convert_models(workspace: dict, *, student_extra: float = 1.0, teacher_extra: float = -1.0) -> dict:
    """HF teacher (cold extra rows) and student (hot extra rows), converted to Megatron."""
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    root = Path(workspace["root"])
    for role, shape, extra, seed in (("teacher", TEACHER_SHAPE, teacher_extra, 1),
                                     ("student", STUDENT_SHAPE, student_extra, 2)):
        build_hf_model(root / f"hf_{role}", shape, extra_logit_scale=extra,
                       tokenizer_dir=workspace["tokenizer_dir"], seed=seed)
        convert_hf_to_megatron(root / f"hf_{role}", root / f"mg_{role}", tp=2)
        workspace.update({f"hf_{role}": str(root / f"hf_{role}"), role: str(root / f"mg_{role}")})
    return workspace


def train_config(workspace: dict, output_dir: str, *, tp: int = 1, train_iters: int = 2,
                 loss: dict | None = None, **sections):
    """A distillation TrainConfig over the converted models (CPU, fp32)."""
    import os

    from megatron_csd.training.config_io import config_from_dict

    tree = {
        "mode": "distill", "device": "cpu", "precision": "fp32",
        "student": {"checkpoint": workspace["student"]}, "teacher": {"checkpoint": workspace["teacher"]},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1},
        "loss": loss or {"objective": "fkl"},
        "optimizer": {"lr": 3e-3, "lr_warmup_iters": 1, "clip_grad": 1.0, "weight_decay": 0.0},
        "training": {"train_iters": train_iters, "global_batch_size": 4, "micro_batch_size": 2,
                     "seq_length": SEQ_LENGTH, "seed": 11, "eval_samples": 8, "packing": False},
        "data": {"train_path": workspace["train"], "valid_path": workspace["valid"],
                 "tokenizer": workspace["tokenizer"]},
        "checkpoint": {"save": os.path.join(output_dir, "checkpoints")},
        "logging": {"output_dir": output_dir, "quiet": True},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)
