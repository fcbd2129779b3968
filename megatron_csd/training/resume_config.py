"""A resumed run trains what it trained before: its config.yaml is compared, never overwritten.

    name = config_file_for(config, output_dir, resumes_latest=..., iteration=N)  # logging rank

On a resume of the save dir's own ``latest`` (a relaunch without ``--load``, or ``--load`` of
that latest) the new resolved config is compared with ``OUTPUT_DIR/config.yaml`` (when there is
one), key by dotted key. A difference in any key not listed below refuses the run with one line
naming the keys (``loss.objective: 'csd' -> 'kl'``, at most 5 shown) unless
``--overwrite-save`` is given. Keys that may change on a resume (they do not change what is
trained, or are meant to be adjusted by a relaunch):

- ``training.train_iters``, ``training.eval_interval``, ``training.eval_samples``,
  ``training.eval_at_start``, ``training.divergence_warning_factor``, ``eval_generate.*``;
- ``optimizer.lr``, ``min_lr``, ``lr_decay_style``, ``lr_warmup_iters``, ``lr_decay_iters``,
  ``clip_grad`` (a resumed run follows the current schedule), ``optimizer.use_distributed_optimizer``;
- ``parallel.*``, ``training.micro_batch_size`` and ``device`` (the layout, not the math);
- ``logging.*``, ``checkpoint.save``, ``save_interval``, ``save_final``, ``load``,
  ``overwrite_save``, ``no_verify_checkpoint``.

Keys that the saved file does not hold (options added since it was written) are not compared,
except those in ``ABSENT_MEANS``, whose absence means the behaviour before them:
``training.packing`` absent = false (unpacked rows; the default before ``auto``).
The file is never overwritten when it differs: the run's config is written as
``config.resume-<iteration>.yaml`` (``.2``, ``.3``, ... appended when taken); when it equals
config.yaml but for the per-launch keys ``checkpoint.load / overwrite_save /
no_verify_checkpoint``, config.yaml is kept as it is and nothing is written.
"""
from __future__ import annotations

import os
from typing import Optional

import yaml

CONFIG_FILE = "config.yaml"
MAX_LISTED = 5
ALLOWED_KEYS = frozenset({
    "training.train_iters", "training.eval_interval", "training.eval_samples",
    "training.eval_at_start", "training.divergence_warning_factor", "training.micro_batch_size",
    "optimizer.lr", "optimizer.min_lr", "optimizer.lr_decay_style", "optimizer.lr_warmup_iters",
    "optimizer.lr_decay_iters", "optimizer.clip_grad", "optimizer.use_distributed_optimizer",
    "checkpoint.save", "checkpoint.save_interval", "checkpoint.save_final", "checkpoint.load",
    "checkpoint.overwrite_save", "checkpoint.no_verify_checkpoint", "device",
})
ALLOWED_SECTIONS = ("logging.", "eval_generate.", "parallel.")
ABSENT_MEANS = {"training.packing": False}
LAUNCH_KEYS = frozenset({"checkpoint.load", "checkpoint.overwrite_save", "checkpoint.no_verify_checkpoint"})


def flatten(tree, prefix: str = "") -> dict:
    """``{"loss": {"objective": "kl"}}`` -> ``{"loss.objective": "kl"}`` (nested mappings only)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _allowed(key: str) -> bool:
    return key in ALLOWED_KEYS or key.startswith(ALLOWED_SECTIONS)


def config_differences(old: dict, new: dict) -> list:
    """[(dotted key, old, new)] of the keys both trees hold that differ and may not change."""
    old_flat, new_flat = {**ABSENT_MEANS, **flatten(old)}, flatten(new)
    return [(key, old_flat[key], new_flat[key]) for key in old_flat
            if key in new_flat and old_flat[key] != new_flat[key] and not _allowed(key)]


def describe(differences: list) -> str:
    shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:MAX_LISTED])
    more = len(differences) - MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _resolved_tree(config) -> dict:
    from megatron_csd.training.config_io import load_yaml_text

    return load_yaml_text(yaml.safe_dump(config.to_dict(), sort_keys=False))  # as it is read back


def _saved_tree(path: str):
    from megatron_csd.training.config_io import load_yaml_text

    try:
        with open(path, encoding="utf-8") as handle:
            tree = load_yaml_text(handle)
    except (OSError, yaml.YAMLError) as err:
        return f"cannot be read ({type(err).__name__})"
    return tree if isinstance(tree, dict) else "does not hold a mapping"


def _unique(directory: str, iteration: int) -> str:
    name = f"config.resume-{iteration}.yaml"
    count = 1
    while os.path.exists(os.path.join(directory, name)):
        count += 1
        name = f"config.resume-{iteration}.{count}.yaml"
    return name


def config_file_for(config, output_dir: str, *, resumes_latest: bool, iteration: int) -> Optional[str]:
    """The file name to write this run's config to (None: config.yaml already says it).

    Raises ``RunRefusedError`` (one line) when resuming the save dir's latest with a config
    that differs from ``output_dir/config.yaml`` in a key that may not change, unless
    ``--overwrite-save``.
    """
    from megatron_csd.training.run_guard import RunRefusedError

    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return CONFIG_FILE
    new, old = _resolved_tree(config), _saved_tree(path)
    if isinstance(old, str):
        differences, what = [], f"{path} {old}"
    else:
        differences = config_differences(old, new)
        what = f"this launch differs from {path} in {describe(differences)}"
    if resumes_latest and (differences or isinstance(old, str)) and not config.checkpoint.overwrite_save:
        raise RunRefusedError(
            f"resuming the run in {output_dir} at iteration {iteration}, but {what}. Relaunch with "
            f"the run's settings, start fresh in a new --output-dir (or --save), or pass "
            f"--overwrite-save to continue with the new settings (written beside it as "
            f"{_unique(output_dir, iteration)})")
    if not isinstance(old, str):
        launch = {key: value for key, value in flatten(old).items() if key not in LAUNCH_KEYS}
        if launch == {key: value for key, value in flatten(new).items() if key not in LAUNCH_KEYS}:
            return None
    return _unique(output_dir, iteration)
