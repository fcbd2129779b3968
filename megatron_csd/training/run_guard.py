"""Start-up guard: one writer per folder, and an existing run is resumed or refused, never overwritten.

    start = guard_run(config, ctx)    # every rank, right after the process groups exist

The logging rank (global rank 0) locks the output dir and the save dir (run_lock.py), then
decides from the save dir's contents; the outcome is broadcast (``broadcast_object_list``) so
every rank raises the same one-line error, or starts with the same checkpoint:

- the save dir holds no checkpoint: start as configured;
- it holds a run (``latest``) and no ``--load`` is given: resume from its latest (printed);
- ``--load`` names that same latest: resume (the usual relaunch);
- ``--load`` names another checkpoint, or the save dir has ``iter_*`` folders but no
  ``latest``: refuse, since training from elsewhere would overwrite this run's ``iter_N``
  and ``latest``; the error names the choices;
- ``--overwrite-save``: start as configured anyway; saves replace only the ``iter_*`` folders
  of the iterations this run saves (publish_checkpoint), everything else is kept;
- the resumed checkpoint is already at ``train_iters``: nothing to do, ``run()`` returns the
  finished run's checkpoint without training, evaluating, logging or saving.

On a resume of the latest, the config must match the run's config.yaml but for the keys
resume_config.py allows (else a one-line refusal, unless ``--overwrite-save``); the outcome
names the file the config is written to, never over a differing config.yaml.

Before that comparison, ``training.packing: auto`` is resolved to true / false (a resume keeps
the run's own setting; packing_setup.py), so config.yaml records what the run does.

Then every rank verifies the checkpoint it will load against its manifest (models/manifest.py;
``--no-verify-checkpoint`` skips it), before any model is built.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_csd.models.manifest import verify_checkpoint
from megatron_csd.training.packing_setup import PackingChoice, resolve_packing_at_start
from megatron_csd.training.resume_config import config_file_for
from megatron_csd.training.run_lock import RunLock, lock_for

_ITERATION_DIR = re.compile(r"^iter_\d{7}(\.alt)?$")
_FRESH = "a new --output-dir (or --save)"


class RunRefusedError(ValueError):
    """The run cannot start on this output / save dir as configured (the message says why)."""


def save_dir_of(config) -> str:
    return config.checkpoint.save or os.path.join(config.logging.output_dir, "checkpoints")


def iteration_dirs(save_dir: str) -> list:
    """Published checkpoint folders (``iter_N``, ``iter_N.alt``) in ``save_dir``, sorted."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(name for name in os.listdir(save_dir)
                  if _ITERATION_DIR.match(name) and os.path.isdir(os.path.join(save_dir, name)))


def _iteration_of(directory: str) -> int:
    from megatron_csd.training.checkpointing import STATE_FILE

    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
        return int(json.load(handle)["iteration"])


def _start_iteration(load_dir: Optional[str]) -> int:
    try:
        return _iteration_of(load_dir) if load_dir is not None else 0
    except (OSError, KeyError, TypeError, ValueError):
        return 0


def decide_start(config) -> dict:
    """What this run does with its save dir: {"load", "message", "finished"}; raises RunRefusedError."""
    from megatron_csd.training.checkpointing import LATEST_FILE, resolve_checkpoint_dir

    save_dir = save_dir_of(config)
    load, overwrite = config.checkpoint.load, config.checkpoint.overwrite_save
    existing = iteration_dirs(save_dir)
    has_latest = os.path.isfile(os.path.join(save_dir, LATEST_FILE))
    plan = {"load": load, "message": None, "finished": None, "resumes_latest": False}
    if not existing and not has_latest:
        return plan
    latest = None
    if has_latest:
        try:
            latest = resolve_checkpoint_dir(save_dir)
        except ValueError as err:
            if not overwrite and load is None:
                raise RunRefusedError(
                    f"the save dir {save_dir} holds a run, but {err}. Resume from one of its "
                    f"complete iter_* folders (--load {save_dir}/iter_N), start fresh in "
                    f"{_FRESH}, or pass --overwrite-save") from None
    if overwrite:
        source = f"from {load}" if load is not None else "from scratch"
        plan["message"] = (f"--overwrite-save: {save_dir} holds an earlier run (latest: "
                           f"{os.path.basename(latest) if latest else 'none'}); starting {source}. "
                           "This run's saves replace that run's iter_* folders of the same "
                           "iterations and move latest; its other folders and files are kept")
    elif load is None:
        if latest is None:
            raise RunRefusedError(
                f"the save dir {save_dir} holds checkpoints ({', '.join(existing[-3:])}) but no "
                f"'{LATEST_FILE}' file, so which one to resume is unclear: pass --load "
                f"{save_dir}/<iter_dir>, start fresh in {_FRESH}, or pass --overwrite-save")
        plan["load"] = save_dir
        plan["message"] = (f"resuming from {latest} at iteration {_iteration_of(latest)} (the "
                           f"save dir already holds a run; pass --overwrite-save or {_FRESH} "
                           "to start fresh)")
    else:
        wanted = os.path.realpath(resolve_checkpoint_dir(load))
        same_run = (os.path.realpath(latest) == wanted if latest is not None
                    else os.path.dirname(wanted) == os.path.realpath(save_dir))
        if not same_run:
            named = f"latest {os.path.basename(latest)}" if latest else "no latest"
            raise RunRefusedError(
                f"--load {load} is not the latest checkpoint of the save dir {save_dir}, which "
                f"holds another run ({named}): training from it there would overwrite that "
                f"run's iter_* and latest. Resume that run (no --load, or --load {save_dir}), "
                f"save this one in {_FRESH}, or pass --overwrite-save")
    resumed = plan["load"]
    if resumed is not None and latest is not None:
        directory = resolve_checkpoint_dir(resumed)
        iteration = _iteration_of(directory)
        plan["resumes_latest"] = os.path.realpath(directory) == os.path.realpath(latest)
        if plan["resumes_latest"] and iteration >= config.training.train_iters:
            plan["finished"] = (iteration, os.path.join(save_dir, os.path.basename(directory)))
            plan["message"] = (f"{directory} is already at iteration {iteration} >= train_iters "
                               f"{config.training.train_iters}: this run is finished, nothing is "
                               "trained, logged or saved. Raise --train-iters to continue it, or "
                               f"start again with --overwrite-save or in {_FRESH}")
    return plan


@dataclass
class RunStart:
    """The guarded start: the config to run (``checkpoint.load`` filled in on a resume)."""

    config: object
    finished: Optional[tuple] = None  # (iteration, checkpoint dir) when nothing is left to do
    lock: Optional[RunLock] = None
    resumes_latest: bool = False  # the checkpoint to load is what the save dir's latest names
    config_file: Optional[str] = None  # where the logging rank writes the config (None: kept)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def finished_result(self):
        from megatron_csd.training.trainer import TrainResult

        self.release()
        iteration, directory = self.finished
        return TrainResult(last_iteration=iteration, checkpoint=directory,
                           output_dir=self.config.logging.output_dir)


def guard_run(config, ctx) -> RunStart:
    """Lock the run's folders, decide how it starts and verify the checkpoint it loads (collective)."""
    from megatron_csd.training.checkpointing import resolve_checkpoint_dir

    outcome: list = [None]
    lock = None
    if ctx.is_logging_rank:
        try:
            lock = lock_for([config.logging.output_dir, save_dir_of(config)], enabled=True)
            outcome = [decide_start(config)]
            if outcome[0]["load"] is not None:  # a bad --load is one line on every rank, too
                outcome[0]["load_dir"] = resolve_checkpoint_dir(outcome[0]["load"])
            if outcome[0]["finished"] is None:  # a changed objective etc. is refused (resume_config.py)
                outcome[0]["packing"] = tuple(resolve_packing_at_start(  # auto -> true / false
                    config, resumes_latest=outcome[0]["resumes_latest"], load_dir=outcome[0].get("load_dir")))
                outcome[0]["config_file"] = config_file_for(
                    PackingChoice(*outcome[0]["packing"]).apply(config), config.logging.output_dir,
                    resumes_latest=outcome[0]["resumes_latest"],
                    iteration=_start_iteration(outcome[0].get("load_dir")))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, or they would hang
            if lock is not None:
                lock.release()
            text = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            outcome = [{"error": text}]
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    plan = outcome[0]
    if "error" in plan:
        raise RunRefusedError(plan["error"])
    if plan["message"] and ctx.is_logging_rank:
        print(f"[megatron_csd] {plan['message']}", flush=True)
    if plan["load"] is not None and plan["finished"] is None:
        try:  # before any model is built: a damaged checkpoint fails in seconds
            verify_checkpoint(plan["load_dir"], enabled=not config.checkpoint.no_verify_checkpoint)
        except ValueError:
            if lock is not None:
                lock.release()
            raise
    if "packing" in plan:
        packing = PackingChoice(*plan["packing"])
        config = packing.apply(config)
        if packing.note and ctx.is_logging_rank:
            print(f"[megatron_csd] {packing.note}", flush=True)
    checkpoint = dataclasses.replace(config.checkpoint, load=plan["load"])
    return RunStart(config=dataclasses.replace(config, checkpoint=checkpoint),
                    finished=plan["finished"], lock=lock, resumes_latest=plan["resumes_latest"],
                    config_file=plan.get("config_file"))


def run_and_release(trainer):
    """``trainer.run()``, releasing its run lock also when it fails (a later run may lock)."""
    try:
        return trainer.run()
    finally:
        trainer.start.release()
