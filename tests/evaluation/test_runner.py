"""The evaluation runner: teacher-forced loss against a dense fp64 recomputation, results files,
and identical results at every layout (DP 2 == DP 1 bitwise; TP 2 and PP 2 equal to rtol 1e-5).

Generation is the fake of tests/evaluation/common.py here (the runner's orchestration is under
test); test_end_to_end.py drives the real generator.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.evaluation.common import build_eval_workspace, fake_generate, save_tiny_model
from tests.spawn import run_distributed

RTOL = 1e-5


def _settings():
    from megatron_csd.evaluation import EvalSettings

    return EvalSettings(seeds=(10, 20), num_samples=6, batch_size=3, max_new_tokens=8)


def _files(workspace):
    from megatron_csd.evaluation import TestFile

    return [TestFile("toy", workspace["valid"]), TestFile("toy_train", workspace["train"])]


def _dense_loss(model, tokenizer, records) -> float:
    """sum mask * -log softmax_fp64(logits[:V])[label] / sum mask, straight from the logits."""
    import torch

    from megatron_csd.data import build_training_sample, tokenize_records

    samples = tokenize_records(records, "dolly", tokenizer, seq_length=10**9)
    seq = max(len(s.ids) for s in samples) - 1
    total, count = 0.0, 0
    for s in samples:
        row = build_training_sample(s.ids, s.prompt_length, seq, tokenizer.pad_id)
        with torch.no_grad():
            logits = model(row["tokens"][None], row["position_ids"][None], None)[0]
        logp = torch.log_softmax(logits[:, :tokenizer.vocab_size].double(), dim=-1)
        nll = -logp.gather(-1, row["labels"][:, None])[:, 0]
        mask = row["loss_mask"] > 0
        total += nll[mask].sum().item()
        count += int(mask.sum())
        # The padded columns (zero logits) must not count: including them changes the loss.
        wrong = -torch.log_softmax(logits.double(), dim=-1).gather(-1, row["labels"][:, None])[:, 0]
        assert (wrong[mask] - nll[mask]).abs().min() > 1e-3
    return total / count


def _evaluate_layouts(rank, world_size, workspace, layouts, out_file, reference_checks):
    from megatron_csd.evaluation import evaluate, write_results
    from megatron_csd.generation import load_for_generation
    from megatron_csd.evaluation.runner import _load_records
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel

    if reference_checks:
        save_tiny_model(rank, world_size, workspace)
    out = {}
    for tp, pp in layouts:
        ctx = initialize_parallel(device="cpu", tensor_model_parallel_size=tp,
                                  pipeline_model_parallel_size=pp, seed=1)
        model, _, tokenizer = load_for_generation(workspace["model"])
        result = evaluate(model, _files(workspace), tokenizer, _settings(), ctx,
                          vocab_size=tokenizer.vocab_size, generate_batch=fake_generate, show_progress=False)
        assert not model.training
        key = f"tp{tp}pp{pp}dp{ctx.dp_size}"
        out[key] = {"json": result.to_json(),
                    "generations": {n: f.generations for n, f in result.files.items()}}
        if reference_checks:
            records = _load_records(_files(workspace)[0], _settings())
            out["dense_loss"] = _dense_loss(model, tokenizer, records)
            out["written"] = write_results(result, os.path.join(workspace["root"], "eval_out"))
        destroy_parallel()
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(out, handle)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runner")
    workspace = build_eval_workspace(root)
    out_file = str(root / "reference.json")
    run_distributed(_evaluate_layouts, 1, workspace, [(1, 1)], out_file, True)
    with open(out_file) as handle:
        return workspace, json.load(handle)


@pytest.mark.slow
def test_response_loss_equals_dense_fp64_recomputation(reference):
    _, out = reference
    loss = out["tp1pp1dp1"]["json"]["files"]["toy"]["metrics"]["response_loss"]
    assert loss["std"] == 0.0
    assert loss["mean"] == pytest.approx(out["dense_loss"], rel=1e-6)


@pytest.mark.slow
def test_results_and_generations_files_have_the_documented_keys(reference):
    from megatron_csd.evaluation import METRIC_NAMES

    workspace, out = reference
    root = os.path.join(workspace["root"], "eval_out")
    assert sorted(os.listdir(root)) == ["generations_toy.jsonl", "generations_toy_train.jsonl", "results.json"]
    with open(os.path.join(root, "results.json")) as handle:
        results = json.load(handle)
    assert set(results) == {"settings", "files", "average"}
    assert list(results["files"]) == ["toy", "toy_train"]
    assert results["settings"]["seeds"] == [10, 20] and results["settings"]["temperature"] == 1.0
    for entry in list(results["files"].values()) + [{"metrics": results["average"]}]:
        assert list(entry["metrics"]) == list(METRIC_NAMES)
        for name, metric in entry["metrics"].items():
            assert {"mean", "std"} <= set(metric)
            if name != "response_loss":
                assert len(metric["per_seed"]) == 2
    toy = results["files"]["toy"]
    assert toy["num_prompts"] == 6 and toy["response_tokens"] > 0
    lines = [json.loads(line) for line in open(os.path.join(root, "generations_toy.jsonl"))]
    assert len(lines) == 12  # 6 prompts x 2 seeds, seed-major
    assert [(g["seed"], g["index"]) for g in lines] == [(s, i) for s in (10, 20) for i in range(6)]
    assert set(lines[0]) == {"file", "index", "seed", "prompt", "reference", "completion",
                             "completion_ids", "finish_reason"}
    assert lines[0]["prompt"].endswith("### Response:\n") and lines[0]["reference"]
    # Averages: the macro mean over the two files, per seed.
    average = results["average"]["rougeL"]["per_seed"]
    files = [results["files"][n]["metrics"]["rougeL"]["per_seed"] for n in ("toy", "toy_train")]
    assert average == pytest.approx([(a + b) / 2 for a, b in zip(*files)])
    # A second evaluation into the same folder is refused before anything is written.
    from megatron_csd.evaluation import check_output_dir

    with pytest.raises(ValueError, match="already holds evaluation results"):
        check_output_dir(root, ["toy"])


@pytest.mark.slow
def test_results_do_not_depend_on_the_layout(reference, tmp_path):
    workspace, out = reference
    out_file = str(tmp_path / "layouts.json")
    run_distributed(_evaluate_layouts, 2, workspace, [(1, 1), (2, 1), (1, 2)], out_file, False)
    with open(out_file) as handle:
        layouts = json.load(handle)
    ref = out["tp1pp1dp1"]
    assert layouts["tp1pp1dp2"] == ref, "DP 2 differs from DP 1"
    for key in ("tp2pp1dp1", "tp1pp2dp1"):
        assert layouts[key]["generations"] == ref["generations"]
        for name in ("toy", "toy_train"):
            got = layouts[key]["json"]["files"][name]
            want = ref["json"]["files"][name]
            assert got["metrics"]["response_loss"]["mean"] == pytest.approx(
                want["metrics"]["response_loss"]["mean"], rel=RTOL), key
            assert got["response_tokens"] == want["response_tokens"]
            assert got["metrics"]["rougeL"] == want["metrics"]["rougeL"]
