"""The trainer's --eval-generate-* hook (real generation): records in metrics.jsonl, generations
saved, training unchanged; the evaluation CLI on the trainer's save dir; the config flags."""
from __future__ import annotations

import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

EVAL_KEYS = {"iteration", "split", "num_prompts", "rougeL", "rougeL_std", "exact_match",
             "exact_match_std", "response_loss", "response_tokens", "gen_length", "gen_length_std",
             "distinct_1", "distinct_1_std", "distinct_2", "distinct_2_std", "self_bleu",
             "self_bleu_std", "eval_time_s"}


def _train_with_and_without_hook(rank, world_size, workspace, out_file):
    from megatron_csd.evaluation.cli import main
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import Trainer

    save_initial_models(workspace)
    losses = {}
    for name, hook in (("plain", {}), ("hooked", {"interval": 1, "data": workspace["valid_jsonl"],
                                                  "num_samples": 8, "seeds": "10,20", "max_new_tokens": 4})):
        config = tiny_config(workspace, os.path.join(workspace["root"], name), mode="sft",
                             train_iters=2, eval_generate=hook)
        losses[name] = Trainer(config).run().train_losses
        destroy_parallel()
    # The evaluation CLI reads a trainer save dir (its latest iter_*; tokenizer stored there).
    root = workspace["root"]
    assert main(["--load", os.path.join(root, "hooked", "checkpoints"), "--test-file",
                 f"valid={workspace['valid_jsonl']}", "--num-samples", "3", "--seeds", "1",
                 "--max-new-tokens", "4", "--device", "cpu", "--quiet",
                 "--output-dir", os.path.join(root, "cli_eval")]) == 0
    with open(out_file, "w") as handle:
        json.dump(losses, handle)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval_generate_hook")
    workspace = build_workspace(str(tmp_path))
    out_file = str(tmp_path / "losses.json")
    run_distributed(_train_with_and_without_hook, 1, workspace, out_file)
    with open(out_file) as handle:
        return tmp_path, json.load(handle)


@pytest.mark.slow
def test_eval_generate_hook_logs_to_metrics_jsonl(trained):
    tmp_path, losses = trained
    assert losses["hooked"] == losses["plain"], "the evaluation hook changed training"
    run_dir = tmp_path / "hooked"
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [r for r in records if r.get("split") == "eval_generate"]
    assert [r["iteration"] for r in evals] == [1, 2]
    for record in evals:
        assert set(record) == EVAL_KEYS
        assert record["num_prompts"] == 8 and record["response_tokens"] > 0
        assert 0.0 <= record["rougeL"] <= 100.0 and record["response_loss"] > 0
        assert record["self_bleu"] is not None  # two seeds
    saved = sorted(os.listdir(run_dir / "eval_generate"))
    assert saved == ["generations_iter_0000001.jsonl", "generations_iter_0000002.jsonl"]
    lines = (run_dir / "eval_generate" / saved[0]).read_text().splitlines()
    assert len(lines) == 16  # 8 prompts x 2 seeds
    # The teacher-forced loss is the trainer's own validation CE on the same 8 held-out samples
    # (eval_samples 8, same seq_length) after the same step: two independent code paths.
    valid = [r for r in records if r.get("split") == "valid" and r["iteration"] == 2]
    assert len(valid) == 1 and valid[0]["response_tokens"] == evals[-1]["response_tokens"]
    assert evals[-1]["response_loss"] == pytest.approx(valid[0]["ce"], rel=1e-5)
    assert not any(r.get("split") == "eval_generate" for r in
                   (json.loads(line) for line in open(tmp_path / "plain" / "metrics.jsonl")))


@pytest.mark.slow
def test_evaluation_cli_reads_a_trainer_save_dir(trained):
    tmp_path, _ = trained
    results = json.loads((tmp_path / "cli_eval" / "results.json").read_text())
    assert results["files"]["valid"]["num_prompts"] == 3
    assert results["files"]["valid"]["metrics"]["response_loss"]["mean"] > 0
    assert len((tmp_path / "cli_eval" / "generations_valid.jsonl").read_text().splitlines()) == 3


def test_eval_generate_flags_parse_and_validate():
    from megatron_csd.training.config_io import parse_config

    base = ["--mode", "sft", "--student-preset", "tiny-gemma", "--train-data", "t.jsonl",
            "--tokenizer", "tok.model"]
    config = parse_config(base + ["--eval-generate-interval", "5", "--eval-generate-data", "v.jsonl",
                                  "--eval-generate-seeds", "10, 20,30", "--eval-generate-max-new-tokens", "16",
                                  "--eval-generate-num-samples", "8"])
    section = config.eval_generate
    assert (section.interval, section.data, section.seeds, section.max_new_tokens, section.num_samples) == \
        (5, "v.jsonl", "10,20,30", 16, 8)
    assert parse_config(base).eval_generate.interval == 0  # off by default
    with pytest.raises(ValueError, match="--eval-generate-data"):
        parse_config(base + ["--eval-generate-interval", "5"])
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_config(base + ["--eval-generate-seeds", "ten"])
    with pytest.raises(ValueError, match="distinct"):
        parse_config(base + ["--eval-generate-seeds", "1,1"])


def test_eval_generate_refuses_what_it_cannot_run(tmp_path):
    from megatron_csd.training.config_io import parse_config
    from megatron_csd.training.generation_eval import check_eval_generate

    data = tmp_path / "v.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    base = ["--mode", "sft", "--student-preset", "tiny-gemma", "--train-data", "t.jsonl",
            "--tokenizer", "tok.model", "--eval-generate-interval", "2"]
    with pytest.raises(ValueError, match="is not a file"):
        check_eval_generate(parse_config(base + ["--eval-generate-data", str(tmp_path / "none.jsonl")]))
    with pytest.raises(ValueError, match="--sequence-parallel"):
        check_eval_generate(parse_config(base + ["--eval-generate-data", str(data), "--tensor-model-parallel-size",
                                                 "2", "--sequence-parallel"]))
    check_eval_generate(parse_config(base + ["--eval-generate-data", str(data)]))  # fine
