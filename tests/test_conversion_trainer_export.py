"""A tiny Gemma student distilled by the trainer (TP 2, CPU/gloo) exports to an HF folder that
transformers loads with the same logits as the Megatron model read from the trainer's checkpoint.
The student's HF side files (hf_config.json, tokenizer_config.json, generation_config.json)
travel through the trainer's checkpoint into the export (token ids, chat template kept).
"""
import json
import os

import pytest
import torch

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

transformers = pytest.importorskip("transformers")


def _write_initial_models(rank, world_size, workspace):
    save_initial_models(workspace)


def _train_then_megatron_logits(rank, world_size, workspace, out_file):
    from megatron_csd.conversion.verify import megatron_logits
    from megatron_csd.models import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, load_model_config
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel
    from megatron_csd.training.trainer import run_training

    result = run_training(tiny_config(workspace, os.path.join(workspace["root"], "run"), tp=2, train_iters=2))
    destroy_parallel()
    assert result.checkpoint is not None
    initialize_parallel(device="cpu", tensor_model_parallel_size=2, pipeline_model_parallel_size=1, seed=3)
    cfg = load_model_config(result.checkpoint)
    model = build_gpt_model(cfg, perform_initialization=False)
    load_model(model, result.checkpoint)
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    logits = megatron_logits(model, tokens)
    if rank == 0:
        torch.save({"tokens": tokens, "logits": logits, "checkpoint": result.checkpoint,
                    "vocab_size": cfg.vocab_size}, out_file)
    destroy_parallel()


@pytest.mark.slow
def test_trainer_checkpoint_exports_to_transformers_with_same_logits(tmp_path):
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=8)
    run_distributed(_write_initial_models, 1, workspace)
    # As if the student had been converted from HF: the original config and tokenizer files.
    student = workspace["student"]
    hf_config = {"model_type": "gemma", "architectures": ["GemmaForCausalLM"], "hidden_size": 999,
                 "bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5, "custom_note": "kept"}
    side_files = {"hf_config.json": json.dumps(hf_config),
                  "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}),
                  "generation_config.json": json.dumps({"bos_token_id": 3, "eos_token_id": 4})}
    for name, text in side_files.items():
        with open(os.path.join(student, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    out_file = str(tmp_path / "megatron_logits.pt")
    run_distributed(_train_then_megatron_logits, 2, workspace, out_file)
    saved = torch.load(out_file)
    hf_dir = tmp_path / "hf_student"
    for name, text in side_files.items():  # carried into the trainer's checkpoint
        with open(os.path.join(saved["checkpoint"], name), encoding="utf-8") as handle:
            assert handle.read() == text, name
    # The save directory itself resolves to its latest iteration; the tokenizer comes from it.
    config = convert_megatron_to_hf(os.path.join(workspace["root"], "run", "checkpoints"), hf_dir)
    assert json.loads((hf_dir / "config.json").read_text()) == config
    assert config["architectures"] == ["GemmaForCausalLM"] and config["custom_note"] == "kept"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (3, 4, 5)
    assert config["hidden_size"] != 999 and config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    with open(workspace["tokenizer"], "rb") as handle:
        assert (hf_dir / "tokenizer.model").read_bytes() == handle.read()
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (hf_dir / name).read_text() == side_files[name], name
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = model(saved["tokens"]).logits
    vocab = saved["vocab_size"]
    assert hf_logits.shape[-1] == vocab
    diff = (hf_logits - saved["logits"][..., :vocab]).abs().max().item()
    print(f"trained student: max |logit diff| transformers vs Megatron = {diff:.3e}")
    assert diff <= 1e-5
