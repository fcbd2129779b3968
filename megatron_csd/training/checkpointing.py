"""Training checkpoints: atomic, resumable, with the student in the model-only layout.

    SAVE/latest                         "iter_0000040" (written last, atomically)
    SAVE/iter_0000040/
        model_config.json, model/       student, models.checkpoint layout (exporter-readable,
                                        loads at any TP/PP via dist_checkpointing)
        tokenizer.model|tokenizer.json  copy of the run's tokenizer
        optimizer/                      dist_checkpointing of optimizer.sharded_state_dict(...)
        trainer_state.json              iteration, scheduler, data sampler position, layout
        rng/rank_00003.pt               per-rank RNG states (torch CPU, CUDA, Megatron tracker)

Atomicity: every rank writes into ``SAVE/iter_0000040.tmp``; after a barrier global rank 0
renames it to ``iter_0000040`` and then replaces ``latest`` (write-to-temp + ``os.replace``),
so a crash at any point leaves the previous checkpoint and its ``latest`` pointer intact.
Exact resume (bitwise-equal losses) needs the same TP/PP/DP layout; model weights and
optimizer state re-shard to another layout (RNG then falls back to fresh seeding, with a
warning).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


@dataclass
class ResumeState:
    iteration: int
    scheduler: dict
    sampler: dict
    layout: dict


def _layout(ctx) -> dict:
    return {"world_size": ctx.world_size, "tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(save_dir: str, iteration: int, *, student, model_config, optimizer, scheduler,
                    sampler_state: dict, ctx, tokenizer_path: Optional[str]) -> str:
    """Write checkpoint ``iteration`` under ``save_dir`` (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing
    from megatron_csd.models.checkpoint import save_model

    final = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp = final + ".tmp"
    if ctx.rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # debris of an earlier crash
        os.makedirs(os.path.join(tmp, "optimizer"))
        os.makedirs(os.path.join(tmp, "rng"))
    dist.barrier()
    save_model(student, tmp, model_config)
    optimizer_state = optimizer.sharded_state_dict(student.sharded_state_dict())
    dist_checkpointing.save(optimizer_state, os.path.join(tmp, "optimizer"))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{ctx.rank:05d}.pt"))
    if ctx.rank == 0:
        state = {"iteration": iteration, "scheduler": scheduler.state_dict(),
                 "sampler": sampler_state, "layout": _layout(ctx)}
        _write_text_atomic(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2))
        if tokenizer_path is not None:
            source = tokenizer_path
            if os.path.isdir(source):
                for name in ("tokenizer.model", "tokenizer.json"):
                    if os.path.isfile(os.path.join(source, name)):
                        source = os.path.join(source, name)
                        break
            if os.path.isfile(source):
                shutil.copy2(source, os.path.join(tmp, os.path.basename(source)))
    dist.barrier()
    if ctx.rank == 0:
        if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): keep it until replaced
            aside = final + ".old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
        _write_text_atomic(os.path.join(save_dir, LATEST_FILE), iteration_dir_name(iteration) + "\n")
    dist.barrier()
    return final


def resolve_checkpoint_dir(load: str) -> str:
    """``load`` may be a save dir (its ``latest`` is used) or one ``iter_*`` directory."""
    if os.path.isfile(os.path.join(load, STATE_FILE)):
        return load
    latest = os.path.join(load, LATEST_FILE)
    if not os.path.isfile(latest):
        if os.path.isfile(os.path.join(load, "model_config.json")):
            raise ValueError(f"{load} is a model-only checkpoint (no trainer state): start from it "
                             "with --student-checkpoint instead of --load")
        raise ValueError(f"--load {load}: no '{LATEST_FILE}' file and no {STATE_FILE}; expected "
                         "a training save directory or one of its iter_* directories")
    with open(latest, encoding="utf-8") as handle:
        name = handle.read().strip()
    directory = os.path.join(load, name)
    if not os.path.isfile(os.path.join(directory, STATE_FILE)):
        raise ValueError(f"{latest} points at {name}, which is incomplete (no {STATE_FILE})")
    return directory


def load_checkpoint(directory: str, *, student, model_config, optimizer, scheduler, ctx) -> ResumeState:
    """Restore student weights, optimizer, scheduler and RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing
    from megatron_csd.models.checkpoint import load_model, load_model_config

    saved_config = load_model_config(directory)
    if saved_config.to_dict() != model_config.to_dict():
        diff = {k: (v, model_config.to_dict().get(k)) for k, v in saved_config.to_dict().items()
                if model_config.to_dict().get(k) != v}
        raise ValueError(f"--load {directory}: the saved student differs from the configured one "
                         f"(field: (saved, configured)) {diff}")
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    load_model(student, directory)
    optimizer_state = optimizer.sharded_state_dict(student.sharded_state_dict(), is_loading=True)
    optimizer.load_state_dict(dist_checkpointing.load(optimizer_state, os.path.join(directory, "optimizer")))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(directory, "rng", f"rank_{ctx.rank:05d}.pt")
    if state["layout"] == _layout(ctx) and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        warnings.warn(f"resuming {directory} on another layout ({state['layout']} -> "
                      f"{_layout(ctx)}): weights and optimizer are re-sharded, RNG is re-seeded, "
                      "so the run is not bitwise identical to an uninterrupted one")
    return ResumeState(iteration=int(state["iteration"]), scheduler=state["scheduler"],
                       sampler=state["sampler"], layout=state["layout"])
