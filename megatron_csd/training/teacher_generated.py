"""SeqKD (``--teacher-generated``): the teacher answers every training prompt once, before training.

Before the first step the trainer's teacher samples one response per training prompt
(temperature 1, top-k/top-p off, as in the SeqKD data of MiniLLM/DistiLLM; seed keyed by (run
seed, 0, sample index), so the file is the same at every TP/PP/DP layout). Each DP rank
generates the prompts ``dp_rank, dp_rank + DP, ...`` with its TP x PP group (collectively);
the completions are gathered over DP and global rank 0 writes them, atomically, to
``OUTPUT_DIR/teacher_generated.jsonl``:

    {"seed": 1234, "num_samples": 4000, "temperature": 1.0, "teacher": "checkpoint ckpt/t"}   header
    {"index": 0, "prompt_ids": [2, ...], "completion_ids": [...], "stopped_on_eos": true}

Training then uses, for every sample, its prompt followed by the teacher's response (the loss
mask covers the response and its eos, as in on_policy.generated_sample). A relaunch or a
resumed run in the same output directory reads the file instead of generating again; a file
written for other data, seed or teacher is an error (it is never overwritten).
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from megatron_csd.training.generated_samples import Completion, keyed_seed, sample_with

FILE_NAME = "teacher_generated.jsonl"
TEMPERATURE = 1.0
CHUNK = 64  # prompts per sampler call (the generator batches them further)


def _header(trainer) -> dict:
    config = trainer.config
    return {"seed": config.training.seed, "num_samples": len(trainer.data.train),
            "temperature": TEMPERATURE, "teacher": config.teacher.describe()}


def _read(path: str, header: dict, dataset) -> dict:
    with open(path, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    if not lines or lines[0] != header:
        raise ValueError(f"{path} was written for another run ({lines[0] if lines else 'empty'}; this "
                         f"run: {header}); remove it or use another --output-dir")
    responses = {}
    for entry in lines[1:]:
        index = int(entry["index"])
        prompt, _ = dataset.prompt_and_response(index)
        if [int(t) for t in prompt] != entry["prompt_ids"]:
            raise ValueError(f"{path}: sample {index} has another prompt than the training data; "
                             "remove the file or use another --output-dir")
        responses[index] = Completion(entry["completion_ids"], bool(entry["stopped_on_eos"]))
    if sorted(responses) != list(range(header["num_samples"])):
        raise ValueError(f"{path} is incomplete ({len(responses)} of {header['num_samples']} samples); "
                         "remove it to generate it again")
    return responses


def _generate_mine(trainer, sample_fn) -> list:
    """[(index, prompt, Completion)] for this DP rank's share of the training prompts."""
    dataset, seq = trainer.data.train, trainer.config.training.seq_length
    mine = list(range(trainer.ctx.dp_rank, len(dataset), trainer.dp_size))
    out = []
    for start in range(0, len(mine), CHUNK):
        chunk = mine[start:start + CHUNK]
        prompts = [[int(t) for t in dataset.prompt_and_response(i)[0]] for i in chunk]
        seeds = [keyed_seed(trainer.config.training.seed, 0, i) for i in chunk]
        completions = sample_with(sample_fn, trainer.stage.teacher, prompts, seeds,
                                  temperature=TEMPERATURE, budgets=[seq + 1 - len(p) for p in prompts],
                                  eos_id=trainer.data.tokenizer.eos_id)
        out += list(zip(chunk, prompts, completions))
        trainer.writer.print(f"[megatron_csd] teacher-generated responses: {start + len(chunk)} "
                             f"of {len(mine)} (this data-parallel rank)")
    return out


def load_or_generate(trainer, sample_fn) -> dict:
    """{sample index: Completion} of the teacher, from the run's file or generated now."""
    path = os.path.join(trainer.config.logging.output_dir, FILE_NAME)
    header = _header(trainer)
    exists = [os.path.isfile(path)]
    dist.broadcast_object_list(exists, src=0)  # one decision for the whole world
    if not exists[0]:
        mine = _generate_mine(trainer, sample_fn)
        gathered = [None] * trainer.dp_size
        dist.all_gather_object(gathered, mine, group=trainer.ctx.dp_group)
        if trainer.ctx.rank == 0:
            entries = sorted((e for part in gathered for e in part), key=lambda e: e[0])
            tmp = path + ".tmp"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(header) + "\n")
                for index, prompt, completion in entries:
                    handle.write(json.dumps({"index": index, "prompt_ids": prompt,
                                             "completion_ids": [int(t) for t in completion.ids],
                                             "stopped_on_eos": completion.stopped_on_eos}) + "\n")
            os.replace(tmp, path)
            trainer.writer.print(f"[megatron_csd] teacher-generated responses written to {path}")
        dist.barrier()
    return _read(path, header, trainer.data.train)
