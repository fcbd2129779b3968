"""NaN logits in generation stop EVERY rank with one clear GenerationError, never a hang.

- the sampler marks a NaN row (-1) and a row with nothing samplable (-2) and raises
  GenerationError (a FloatingPointError) naming the request and the step;
- PP 2 (gloo, 2 processes): a NaN in the last stage's output weight -> both stages raise the
  same error (before the fix the first stage waited in the ids broadcast until the timeout);
- TP 2: a NaN in one vocabulary shard only (rank 0's rows) -> both TP ranks raise, greedy and
  with top-k / top-p sampling;
- tools/generate.py on a checkpoint with NaN weights prints one line (no traceback), status 1.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.spawn import run_distributed

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9], [1, 7, 11, 13]]


def test_sampler_marks_nan_and_unsamplable_rows_and_raises():
    from megatron_csd.generation import GenerationError, SamplingParams
    from megatron_csd.generation.sampler import choose_token_codes, choose_tokens

    logits = torch.zeros(3, 8)
    logits[0, 2] = 1.0
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    for params in (SamplingParams(greedy=True), SamplingParams(top_k=3, top_p=0.9)):
        kwargs = dict(vocab_start=0, limit=8, seeds=[0, 1, 2], steps=[4, 4, 4], tp_group=None)
        codes = choose_token_codes(logits, params, **kwargs)
        assert codes.tolist()[1:] == [-1, -2] and 0 <= int(codes[0]) < 8
        with pytest.raises(GenerationError, match=r"request 1 at step 4: the model's logits are NaN"):
            choose_tokens(logits, params, **kwargs)
        with pytest.raises(GenerationError, match="no token can be sampled"):
            choose_tokens(logits[2:], params, **dict(kwargs, seeds=[2], steps=[0]))
    assert issubclass(GenerationError, FloatingPointError)


def _model(tp, pp):
    from megatron.core import parallel_state

    from megatron_csd.models import ModelConfig, build_gpt_model
    from megatron_csd.parallel.initialize import initialize_parallel

    initialize_parallel(device="cpu", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=0)
    cfg = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                      num_attention_heads=4, vocab_size=128, max_position_embeddings=64,
                      tie_embeddings=False)
    model = build_gpt_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())
    return model.eval(), cfg


def _outcome(model, cfg, params):
    from megatron_csd.generation import GenerationError, GenerationRequest, generate

    requests = [GenerationRequest(prompt, seed=i) for i, prompt in enumerate(PROMPTS)]
    try:
        generate(model, requests, params, vocab_size=cfg.vocab_size)
    except GenerationError as err:
        return str(err)
    return "no error"


def _layouts_body(rank, world_size, out_dir):
    from megatron.core import parallel_state

    from megatron_csd.generation import SamplingParams

    seen = {}
    model, cfg = _model(1, 2)
    if parallel_state.is_pipeline_last_stage():
        with torch.no_grad():
            model.output_layer.weight[7, 3] = float("nan")
    seen["pp2"] = _outcome(model, cfg, SamplingParams(greedy=True, max_new_tokens=4))
    model, cfg = _model(2, 1)  # TP 2: rows 0..63 of the output weight live on TP rank 0 only
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        with torch.no_grad():
            model.output_layer.weight[20] = float("nan")
    for name, params in (("tp2_greedy", SamplingParams(greedy=True, max_new_tokens=4)),
                         ("tp2_sampled", SamplingParams(top_k=5, top_p=0.9, max_new_tokens=4))):
        seen[name] = _outcome(model, cfg, params)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_nan_logits_raise_on_every_rank_at_tp2_and_pp2(tmp_path):
    run_distributed(_layouts_body, 2, str(tmp_path), timeout=180)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, message in seen.items():
            assert message.startswith("request 0 at step 0: the model's logits are NaN: the "
                                      "checkpoint is damaged or diverged"), (rank, name, message)


def _save_nan_checkpoint(rank, world_size, directory):
    from megatron_csd.models.checkpoint import save_model

    model, cfg = _model(1, 1)
    with torch.no_grad():
        model.decoder.final_layernorm.weight[0] = float("nan")
    save_model(model, directory, cfg)


@pytest.mark.slow
def test_generate_cli_prints_one_line_for_a_nan_checkpoint(tmp_path):
    run_distributed(_save_nan_checkpoint, 1, str(tmp_path / "nan_ckpt"), timeout=180)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    cmd = [sys.executable, str(REPO / "tools" / "generate.py"), "--load", str(tmp_path / "nan_ckpt"),
           "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
           "--greedy", "--max-new-tokens", "4", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.jsonl").exists()
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["generate.py: error: request 0 at step 0: the model's logits are NaN: the "
                      "checkpoint is damaged or diverged (check it, e.g. resume from an earlier "
                      "checkpoint)"], proc.stderr


def _raise_nan(*args, **kwargs):
    from megatron_csd.generation import GenerationError

    raise GenerationError("request 3 at step 5: the model's logits are NaN: the checkpoint is "
                          "damaged or diverged")


def test_trainer_and_evaluate_clis_turn_generation_error_into_one_line(monkeypatch, capsys):
    """On-policy / eval-generate runs and evaluate: status 1, one line, no traceback."""
    import megatron_csd.evaluation.cli as evaluate_cli
    import megatron_csd.training.config_io as config_io
    import megatron_csd.training.trainer as trainer
    from megatron_csd.training.cli import main

    monkeypatch.setattr(config_io, "parse_config", lambda argv: object())
    monkeypatch.setattr(trainer, "run_training", _raise_nan)
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [line for line in err.splitlines() if line.startswith("megatron_csd: run stopped")]
    assert err == ["megatron_csd: run stopped: request 3 at step 5: the model's logits are NaN: the "
                   "checkpoint is damaged or diverged"], err
    monkeypatch.setattr(evaluate_cli, "run", _raise_nan)
    assert evaluate_cli.main(["--load", "x", "--test-file", "a=b.jsonl", "--output-dir", "o"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: request 3 at step 5: the model's logits are NaN: the checkpoint is "
                   "damaged or diverged"], err
