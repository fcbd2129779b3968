"""On-policy distillation in the trainer, with real generation (megatron_csd.generation).

Same tiny teacher/student checkpoints and data as test_training_layouts.py (global batch 4,
micro batch 1, 3 iterations of CSD SS):

* ``--student-data-ratio 0`` runs the on-policy batch builder but replaces nothing: its losses
  are bitwise those of the plain off-policy run;
* at ratio 1, every row of a step is exactly ``prompt + generate(prompt, keyed seed, own
  budget) (+ eos)`` and its loss mask exactly the generated targets (real generation);
* ``--student-data-ratio 0.5`` (student samples generated every step, temperature 1) gives the
  same losses at TP1, TP2 and PP2 to rtol 1e-5 -- the replaced samples are keyed by (seed,
  iteration, global sample index) and sampling is layout-independent -- and different losses
  from the off-policy run;
* ImitKD (ratio 1 through a replay buffer of 3 samples; CSD TS at temperature 2) agrees at
  TP1 and DP2 (the buffer is
  all-gathered over DP, identical everywhere);
* SeqKD (``--teacher-generated``; fkl with kd_ratio 0.5) writes the same teacher responses at TP1 and TP2 and trains
  to the same losses;
* the LM term (``--lm-data``, ``--lm-coef 0.5``): the logged loss minus the distillation term
  is 0.5 x the student's CE on the drawn text windows, recomputed here in fp64 from the initial
  student (first step); TP1 and DP2 agree; ``--lm-coef 0`` leaves the off-policy losses bitwise;
* a DistiLLM run (srkl, adaptive schedule, buffer of 3, validation every step) saved at iteration 2
  and resumed from there reproduces the straight run's iterations 3-4 (loss, grad norm,
  student-sample statistics) and its final validation bitwise.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

RTOL = 1e-5


IMITKD = {"student_data_ratio": 1.0, "replay_buffer_size": 3}
SEQKD = {"teacher_generated": True}
# other objectives in the other modes (the loss path is the same in every mode)
IMITKD_LOSS = {"objective": "csd", "weights": "TS", "temperature": 2.0}
SEQKD_LOSS = {"objective": "fkl", "kd_ratio": 0.5}
DISTILLM = {"student_data_ratio": 0.5, "replay_buffer_size": 3, "adaptive_student_data": True,
            "adaptive_loss_eps": 0.0}


def _config(workspace, name, *, ratio=None, on_policy=None, **sections):
    on_policy = dict(on_policy or ({} if ratio is None else {"student_data_ratio": ratio}))
    sections.setdefault("checkpoint", {}).setdefault("save_final", False)
    return tiny_config(workspace, os.path.join(workspace["root"], name), on_policy=on_policy, **sections)


def _metrics(workspace, name) -> list:
    with open(os.path.join(workspace["root"], name, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _runs(workspace, runs) -> dict:
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    record = {}
    for name, kwargs in runs:
        result = run_training(_config(workspace, name, **kwargs))
        destroy_parallel()
        record[name] = {"train": result.train_losses,
                        "valid": [[v["ce"], v["kd"]] for v in result.validation]}
    return record


def _write_lm_text(workspace) -> str:
    path = os.path.join(workspace["root"], "lm.txt")
    with open(workspace["train_jsonl"]) as source, open(path, "w") as out:
        for line in source:
            entry = json.loads(line)
            out.write(f"{entry['instruction']} {entry['response']}\n\n")
    return path


def _reference_lm_ce(workspace, lm_path, seed, num_windows) -> float:
    """fp64 CE of the initial student on the first step's LM windows (world of 1, TP1)."""
    import torch

    from megatron_csd.data import ResumableSampler, load_tokenizer
    from megatron_csd.models import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, load_model_config
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel
    from megatron_csd.training.lm_term import LMWindows

    tokenizer = load_tokenizer(workspace["tokenizer"])
    windows = LMWindows(lm_path, tokenizer, 32)
    indices = ResumableSampler(len(windows), seed=seed + 1).next_indices(num_windows)
    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=3)
    model = build_gpt_model(load_model_config(workspace["student"]))
    load_model(model, workspace["student"])
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for index in indices:
            sample = windows[index]
            logits = model(sample["tokens"][None], sample["position_ids"][None], None)[0]
            logp = torch.log_softmax(logits[:, :tokenizer.vocab_size].double(), dim=-1)
            total += -logp.gather(1, sample["labels"][:, None]).sum().item()
            count += sample["labels"].numel()
    destroy_parallel()
    return total / count


def _generated_rows_against_direct_generation(workspace) -> int:
    """Step 1 at ratio 1: each row is prompt + what generate() gives for that prompt and seed
    with the sample's own budget (+ eos when it stopped on eos); the loss mask is exactly the
    generated targets. Returns how many rows stopped on eos."""
    import torch

    from megatron_csd.data import ResumableSampler
    from megatron_csd.generation import GenerationRequest, SamplingParams, generate
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.generated_samples import keyed_seed
    from megatron_csd.training.trainer import Trainer

    trainer = Trainer(_config(workspace, "masks", ratio=1.0))
    dataset, eos = trainer.data.train, trainer.data.tokenizer.eos_id
    batches, count = trainer.on_policy.step_iterator(1)
    rows = [(b["tokens"][0], b["labels"][0], b["loss_mask"][0]) for b in batches]
    indices = ResumableSampler(len(dataset), seed=11).next_indices(count)
    stopped = 0
    for g, (index, (tokens, labels, mask)) in enumerate(zip(indices, rows)):
        prompt = [int(t) for t in dataset.prompt_and_response(index)[0]]
        params = SamplingParams(temperature=1.0, max_new_tokens=33 - len(prompt), eos_id=eos,
                                decodable_vocab_size=trainer.data.tokenizer.vocab_size)
        result = generate(trainer.student, [GenerationRequest(prompt, seed=keyed_seed(11, 1, g))],
                          params, vocab_size=trainer.plan.vocab_size)[0]
        ids = prompt + list(result.completion_ids) + ([eos] if result.finish_reason == "eos" else [])
        stopped += result.finish_reason == "eos"
        want_mask = torch.tensor([len(prompt) <= t + 1 < len(ids) for t in range(32)], dtype=torch.float32)
        assert torch.equal(mask, want_mask), (g, ids)
        assert tokens[:len(ids) - 1].tolist() == ids[:-1] and labels[mask > 0].tolist() == ids[len(prompt):]
        assert (tokens[len(ids) - 1:] == dataset.pad_id).all()  # padding only after the sample
    destroy_parallel()
    return stopped


def _train_records(workspace, name, keys) -> list:
    return [[r.get(k) for k in keys] for r in _metrics(workspace, name) if r["split"] == "train"]


def _world_of_one(rank, world_size, workspace, out_file):
    save_initial_models(workspace)
    record = _runs(workspace, [("off", {}), ("zero", {"ratio": 0.0}), ("half_tp1", {"ratio": 0.5}),
                               ("imitkd_tp1", {"on_policy": IMITKD, "loss": IMITKD_LOSS}),
                               ("seqkd_tp1", {"on_policy": SEQKD, "loss": SEQKD_LOSS})])
    record["generated"] = _train_records(workspace, "half_tp1", ["generated_samples"])
    record["masks_checked_eos_stops"] = _generated_rows_against_direct_generation(workspace)
    record["imitkd_stats"] = _train_records(workspace, "imitkd_tp1", ["generated_samples", "replayed_samples"])
    record["seqkd_stats"] = _train_records(workspace, "seqkd_tp1", ["teacher_samples"])
    lm = {"lm_data": _write_lm_text(workspace), "lm_coef": 0.5}
    record.update(_runs(workspace, [("lm_zero", {"on_policy": {**lm, "lm_coef": 0.0}}),
                                    ("lm_tp1", {"on_policy": lm})]))
    record["lm_first"] = _train_records(workspace, "lm_tp1", ["loss", "kd"])[0]
    record["lm_reference_ce"] = _reference_lm_ce(workspace, lm["lm_data"], 11, 4)
    distillm = {"on_policy": DISTILLM, "train_iters": 4, "training": {"eval_interval": 1},
                "loss": {"objective": "srkl"}}
    record.update(_runs(workspace, [
        ("straight", {**distillm, "checkpoint": {"save_interval": 2}}),
        ("resumed", {**distillm, "checkpoint": {"load": os.path.join(
            workspace["root"], "straight", "checkpoints", "iter_0000002")}})]))
    keys = ["loss", "grad_norm", "generated_samples", "replayed_samples", "student_data_ratio"]
    record["resume_stats"] = [_train_records(workspace, name, keys) for name in ("straight", "resumed")]
    with open(out_file, "w") as handle:
        json.dump(record, handle)


def _world_of_two(rank, world_size, workspace, out_file):
    record = _runs(workspace, [("half_tp2", {"ratio": 0.5, "tp": 2}), ("half_pp2", {"ratio": 0.5, "pp": 2}),
                               ("imitkd_dp2", {"on_policy": IMITKD, "loss": IMITKD_LOSS}),
                               ("seqkd_tp2", {"on_policy": SEQKD, "loss": SEQKD_LOSS, "tp": 2}),
                               ("lm_dp2", {"on_policy": {"lm_data": os.path.join(workspace["root"], "lm.txt"),
                                                         "lm_coef": 0.5}})])
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(record, handle)


@pytest.mark.slow
def test_on_policy_losses_zero_ratio_bitwise_layouts_agree_and_resume_is_bitwise(tmp_path):
    workspace = build_workspace(str(tmp_path))
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run_distributed(_world_of_one, 1, workspace, one)
    run_distributed(_world_of_two, 2, workspace, two)
    with open(one) as handle:
        record = json.load(handle)
    with open(two) as handle:
        record.update(json.load(handle))

    assert record["zero"] == record["off"]                       # bitwise, validation included
    assert record["lm_zero"] == record["off"]
    loss, kd = record["lm_first"]
    assert loss - kd == pytest.approx(0.5 * record["lm_reference_ce"], rel=RTOL)
    assert sum(n for n, in record["generated"]) > 0
    assert record["imitkd_stats"] == [[4, 4]] * 3 and record["seqkd_stats"] == [[4]] * 3
    for name in ("half_tp1", "imitkd_tp1", "seqkd_tp1", "lm_tp1"):  # other data was trained on
        assert record[name]["train"] != record["off"]["train"], name
    for name, reference in (("half_tp2", "half_tp1"), ("half_pp2", "half_tp1"),
                            ("imitkd_dp2", "imitkd_tp1"), ("seqkd_tp2", "seqkd_tp1"),
                            ("lm_dp2", "lm_tp1")):
        assert record[name]["train"] == pytest.approx(record[reference]["train"], rel=RTOL), name
        for got, want in zip(record[name]["valid"], record[reference]["valid"]):
            assert got == pytest.approx(want, rel=RTOL), name
    with open(os.path.join(workspace["root"], "seqkd_tp1", "teacher_generated.jsonl")) as one_file, \
            open(os.path.join(workspace["root"], "seqkd_tp2", "teacher_generated.jsonl")) as two_file:
        assert one_file.read() == two_file.read()

    straight, resumed = record["straight"], record["resumed"]
    assert len(straight["train"]) == 4 and len(resumed["train"]) == 2
    assert resumed["train"] == straight["train"][2:]
    assert resumed["valid"][-1] == straight["valid"][-1]
    straight_stats, resumed_stats = record["resume_stats"]
    assert resumed_stats == straight_stats[2:]
    assert any(stats[3] for stats in straight_stats[2:])          # the buffer was drawn from
