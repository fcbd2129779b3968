"""Training checkpoints: atomic, resumable, with the student in the model-only layout.

    SAVE/latest                         "iter_0000040" (written last, atomically)
    SAVE/iter_0000040/
        model_config.json, model/       student, models.checkpoint layout (exporter-readable,
                                        loads at any TP/PP via dist_checkpointing)
        tokenizer.model|tokenizer.json  copy of the run's tokenizer
        hf_config.json, tokenizer_config.json, generation_config.json, ...
                                        HF side files copied from the student's source
                                        checkpoint when it has them (the exporter keeps
                                        token ids and the chat template from them)
        optimizer/                      dist_checkpointing of optimizer.sharded_state_dict(...)
        trainer_state.json              iteration, scheduler, data sampler position, layout
        rng/rank_00003.pt               per-rank RNG states (torch CPU, CUDA, Megatron tracker)

Atomicity: every rank writes into ``SAVE/iter_0000040.tmp``; after a barrier global rank 0
renames it to ``iter_0000040`` and then replaces ``latest`` (write-to-temp + ``os.replace``),
so a crash at any point leaves the previous checkpoint and its ``latest`` pointer intact. The
directory ``latest`` names is never renamed or deleted: re-saving that same iteration publishes
``iter_0000040.alt`` instead (see :func:`publish_checkpoint`); readers follow ``latest``.
Exact resume (bitwise-equal losses) needs the same TP/PP/DP layout. Model weights re-shard to
any layout; optimizer state re-shards to any layout with the plain optimizer (CPU default) and
over DP only with the distributed optimizer (GPU default); on another layout RNG falls back to
fresh seeding, with a warning.
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
# Megatron's distributed optimizer: its own bucket-space layout (fully parallel save/load,
# re-shards over DP only). megatron-core 0.16.1 cannot reload 'fully_reshardable' or
# 'fully_sharded_model_space' without Apex/TE (seen on an H100), so those are not used.
# Ignored by the non-distributed optimizers, whose state is saved per parameter (any layout).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
STATE_FILE = "trainer_state.json"
ALTERNATE_SUFFIX = ".alt"  # second name of an iteration directory, used when re-saving it


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


def save_checkpoint(save_dir: str, iteration: int, **kwargs) -> str:
    """Write checkpoint ``iteration`` under ``save_dir`` (collective); see ``_save_checkpoint``.

    A write that fails with an OSError (e.g. a full disk) on any rank raises CheckpointSaveError
    on every rank, naming the path, after removing ``iter_N.tmp`` (training/save_failure.py).
    """
    from megatron_csd.training.save_failure import CheckpointSaveError, agree_on_save_failure

    try:
        return _save_checkpoint(save_dir, iteration, **kwargs)
    except CheckpointSaveError:  # already agreed on by every rank
        raise
    except OSError as err:
        ctx = kwargs["ctx"]
        tmp = os.path.join(save_dir, iteration_dir_name(iteration)) + ".tmp"
        agree_on_save_failure(err, tmp, rank=ctx.rank, device=ctx.device)
        raise


def _save_checkpoint(save_dir: str, iteration: int, *, student, model_config, optimizer, scheduler,
                     sampler_state: dict, ctx, tokenizer_path: Optional[str],
                     student_source: Optional[str] = None) -> str:
    """Write checkpoint ``iteration`` under ``save_dir`` (collective: every rank calls it).

    ``student_source``: the checkpoint folder the student started from, whose HF side files
    (hf_config.json, tokenizer files, generation_config.json) are carried along; default:
    the folder ``student`` was last loaded from (the student checkpoint, or the resumed
    checkpoint, which carries them too) or saved to by this function.
    """
    from megatron.core import dist_checkpointing
    from megatron_csd.models.checkpoint import (
        checkpoint_source,
        copy_side_files,
        record_checkpoint_source,
        save_model,
    )
    from megatron_csd.models.manifest import write_manifest
    from megatron_csd.training.save_failure import agree_on_save_failure

    final = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp = final + ".tmp"
    if ctx.rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # debris of an earlier crash
        os.makedirs(os.path.join(tmp, "optimizer"))
        os.makedirs(os.path.join(tmp, "rng"))
    agree_on_save_failure(None, tmp, rank=ctx.rank, device=ctx.device)  # the barrier, + failures
    save_model(student, tmp, model_config)
    optimizer_state = optimizer.sharded_state_dict(student.sharded_state_dict(),
                                                   metadata=dict(_OPTIMIZER_METADATA))
    dist_checkpointing.save(optimizer_state, os.path.join(tmp, "optimizer"))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{ctx.rank:05d}.pt"))
    if ctx.rank == 0:
        state = {"iteration": iteration, "scheduler": scheduler.state_dict(),
                 "sampler": sampler_state, "layout": _layout(ctx)}
        _write_text_atomic(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=2))
        source_dir = student_source or checkpoint_source(student)
        if source_dir is not None and os.path.isdir(source_dir):
            copy_side_files(source_dir, tmp)  # the run's tokenizer below wins on a name clash
        if tokenizer_path is not None:
            source = tokenizer_path
            if os.path.isdir(source):
                for name in ("tokenizer.model", "tokenizer.json"):
                    if os.path.isfile(os.path.join(source, name)):
                        source = os.path.join(source, name)
                        break
            if os.path.isfile(source):
                shutil.copy2(source, os.path.join(tmp, os.path.basename(source)))
    agree_on_save_failure(None, tmp, rank=ctx.rank, device=ctx.device)  # the barrier, + failures
    if ctx.rank == 0:  # every rank's files are complete: checksum them before publishing
        write_manifest(tmp)  # an OSError here meets the other ranks in the agreement below
    agree_on_save_failure(None, tmp, rank=ctx.rank, device=ctx.device)
    published, publish_error = None, None
    if ctx.rank == 0:
        try:
            published = publish_checkpoint(save_dir, tmp, iteration)
        except OSError as err:  # met by every rank in the agreement below, not a lone raise
            publish_error = err
    agree_on_save_failure(publish_error, tmp, rank=ctx.rank, device=ctx.device)
    names = [published]
    dist.broadcast_object_list(names, src=0)
    dist.barrier()
    # The published folder now holds the side files (an older source may be deleted later,
    # e.g. when the iteration it was is re-saved under its alternate name).
    record_checkpoint_source(student, names[0])
    return names[0]


def _read_latest(save_dir: str) -> Optional[str]:
    path = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def publish_checkpoint(save_dir: str, tmp: str, iteration: int) -> str:
    """Move the complete ``tmp`` into place as checkpoint ``iteration`` and point ``latest`` at it.

    Invariant: ``latest`` only ever names a complete directory, whatever step a crash hits.
    A directory is never renamed or deleted while ``latest`` names it, so a re-save of the
    iteration ``latest`` already names goes to the alternate name ``iter_N.alt`` (then the
    next re-save goes back to ``iter_N``); ``latest`` switches with one atomic ``os.replace``
    and the superseded copy is deleted afterwards. Returns the published directory.
    """
    base = iteration_dir_name(iteration)
    current = _read_latest(save_dir)
    name = base if current != base else base + ALTERNATE_SUFFIX
    target = os.path.join(save_dir, name)
    if os.path.exists(target):  # not named by latest: a stale copy (e.g. a crash before latest moved)
        shutil.rmtree(target)
    os.replace(tmp, target)
    _write_text_atomic(os.path.join(save_dir, LATEST_FILE), name + "\n")
    for other in (base, base + ALTERNATE_SUFFIX):  # the superseded copy of this iteration
        if other != name and os.path.exists(os.path.join(save_dir, other)):
            shutil.rmtree(os.path.join(save_dir, other))
    return target


def resolve_checkpoint_dir(load: str) -> str:
    """``load`` may be a save dir (its ``latest`` is used) or one ``iter_*`` directory."""
    from megatron_csd.training.save_failure import reject_unfinished_save

    reject_unfinished_save(load, state_file=STATE_FILE, latest_file=LATEST_FILE)
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


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer's inner torch Adam its (zero) state tensors.

    Without Apex / Transformer Engine, Megatron's DistributedOptimizer wraps torch's AdamW,
    whose state is created lazily at the first step; its ``state_dict()`` (called while
    building the sharded state dict for loading) asserts that every parameter has a step.
    The placeholders are overwritten by the checkpoint's values.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or len(inner.state):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}


def _saved_adam_steps(loaded: dict) -> list:
    """Adam step counts stored in a loaded distributed-optimizer state (one per chained optimizer)."""
    if "optimizer" in loaded:
        groups = [loaded]
    else:  # ChainedOptimizer with several optimizers: {index: state}
        groups = [loaded[key] for key in sorted(k for k in loaded if isinstance(k, int))]
    steps = []
    for state in groups:
        values = {g.get("step") for g in state.get("optimizer", {}).get("param_groups", [])}
        values.discard(None)
        steps.append(values.pop() if len(values) == 1 else None)
    return steps


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Per-parameter Adam ``step`` tensors with the saved count, after a distributed-optimizer load.

    megatron-core 0.16.1, torch-AdamW path (no Apex/TE): ``step`` is a non-persistent entry of
    the dp_reshardable parameter state, so loading copies the FRESH optimizer's placeholder
    into it, and ``load_state_dict`` shares one step tensor between all parameters, which
    torch's foreach AdamW then increments once per parameter. Either way the bias correction
    after a resume was wrong (seen on an H100: the first step after a load matched, the
    second did not). The count saved in the param groups is the right one.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt, step in zip(chained, _saved_adam_steps(loaded)):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or step is None:
            continue
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)


def load_checkpoint(directory: str, *, student, model_config, optimizer, scheduler, ctx,
                    verify: bool = False) -> ResumeState:
    """Restore student weights, optimizer, scheduler and RNG; returns the trainer state.

    ``verify``: check every file against the checkpoint's manifest first (models/manifest.py);
    the trainer does that earlier, in run_guard.guard_run, before it builds the models.
    """
    from megatron.core import dist_checkpointing
    from megatron_csd.models.checkpoint import load_model, load_model_config
    from megatron_csd.models.manifest import verify_checkpoint

    verify_checkpoint(directory, enabled=verify)

    saved_config = load_model_config(directory)
    if saved_config.to_dict() != model_config.to_dict():
        diff = {k: (v, model_config.to_dict().get(k)) for k, v in saved_config.to_dict().items()
                if model_config.to_dict().get(k) != v}
        raise ValueError(f"--load {directory}: the saved student differs from the configured one "
                         f"(field: (saved, configured)) {diff}; resume with the saved run's model, or start this "
                         "one with --overwrite-save or in a new --output-dir / --save")
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    load_model(student, directory, verify=False)  # verified above, optimizer and RNG too
    _materialize_distributed_optimizer_state(optimizer)
    optimizer_state = optimizer.sharded_state_dict(student.sharded_state_dict(), is_loading=True,
                                                   metadata=dict(_OPTIMIZER_METADATA))
    loaded = dist_checkpointing.load(optimizer_state, os.path.join(directory, "optimizer"))
    with torch.no_grad():  # main params are leaves that require grad; loading copies into them
        optimizer.load_state_dict(loaded)
    _restore_adam_steps(optimizer, loaded)
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
