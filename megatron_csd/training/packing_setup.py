"""Whether a run packs (``training.packing``), and its training rows: the samples or packed bins.

``training.packing`` is ``auto`` (the default), ``true`` (``--packing``) or ``false``
(``--no-packing``). :func:`resolve_packing_at_start` turns ``auto`` into true or false once, at
start-up, before data or models are built and before the config is compared with / written to
``config.yaml`` (run_guard.py), so the file records what the run does:

- resuming a run (a relaunch: the save dir's own latest; or ``--load`` of a checkpoint whose
  run's config.yaml is found beside its save dir): that run's setting (a key absent there means
  false, the default before ``auto``), so a resume never changes the rows the sampler's saved
  cursor walks;
- otherwise on exactly where packing is supported and verified: the local layer spec (the
  block-diagonal mask path, tested exact on CPU) without on-policy options, models whose
  attention and positions can be isolated (models.packed_attention.packing_refusal). Off, with
  one start-up line saying why, for the on-policy options (they replace the responses of
  single-sample rows), for the transformer-engine spec (its THD path has never run on a GPU;
  ``--packing`` forces it) and for models packing refuses.

Explicit true / false are kept as given: ``--packing`` still fails at start-up where packing
cannot work (on-policy options here, layer specs in model_setup), and a value that differs from
a resumed run's is refused by resume_config.py naming ``training.packing``. Packing itself: the
dataset becomes a ``PackedDataset`` (seeded by ``training.seed``), reported with the padding
fraction before and after; model_setup makes the models isolate samples. Evaluation stays
unpacked (one sample per row).
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import yaml

from megatron_csd.training.config import TrainConfig
from megatron_csd.training.resume_config import CONFIG_FILE


class PackingChoice(NamedTuple):
    enabled: bool
    note: Optional[str] = None  # the start-up line when auto resolved off

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` with ``training.packing`` resolved to ``enabled``."""
        return dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                        packing=self.enabled))


def packing_enabled(config: TrainConfig) -> bool:
    """True / False of a resolved config (``auto`` must have been resolved at start-up)."""
    value = config.training.packing
    if not isinstance(value, bool):
        raise ValueError(f"training.packing is {value!r}, not resolved: the trainer resolves "
                         "'auto' at start-up (packing_setup.resolve_packing_at_start)")
    return value


def _model_configs(config: TrainConfig) -> list:
    """The run's ModelConfigs as far as they can be read without the tokenizer (a preset with
    its overrides, a checkpoint's model_config.json); unreadable ones are left to
    model_setup.plan_models, which reports them."""
    from megatron_csd.models import get_preset
    from megatron_csd.models.checkpoint import load_model_config

    found = []
    for ref in [config.student] + ([config.teacher] if config.distill else []):
        try:
            found.append(get_preset(ref.preset).replace(**ref.overrides) if ref.preset is not None
                         else load_model_config(ref.checkpoint))
        except (ValueError, TypeError, KeyError, OSError):
            continue
    return found


def auto_refusal(config: TrainConfig, *, use_te: bool) -> Optional[str]:
    """Why ``packing: auto`` resolves off for ``config`` (None: it resolves on). ``use_te``:
    whether the models get the transformer-engine layer spec (models.builder.uses_te_spec)."""
    from megatron_csd.models.packed_attention import packing_refusal

    if config.on_policy.enabled:
        return "on-policy options: they replace the responses of single-sample rows"
    if use_te:
        return "transformer-engine spec: THD path unverified on GPU; --packing to force"
    for model_config in _model_configs(config):
        refusal = packing_refusal(getattr(model_config, "window_size", None),
                                  model_config.position_embedding_type)
        if refusal is not None:
            return f"not supported with {refusal}"
    return None


def resolve_packing(config: TrainConfig, *, use_te: bool, resumed: Optional[dict] = None) -> PackingChoice:
    """``training.packing`` as the run will use it (module doc). ``resumed``: the config.yaml
    tree of the run being resumed (its save dir's latest), else None."""
    value = config.training.packing
    if isinstance(value, bool):
        return PackingChoice(value)
    if resumed is not None:
        saved = (resumed.get("training") or {}).get("packing", False)
        if isinstance(saved, bool):
            note = None if saved else ("packing: off (as in the run being resumed, whose "
                                       "config.yaml has it off; its rows cannot change mid-run)")
            return PackingChoice(saved, note)
    refusal = auto_refusal(config, use_te=use_te)
    return PackingChoice(True) if refusal is None else PackingChoice(False, f"packing: off ({refusal})")


def _resumed_run_config(directory: str) -> Optional[dict]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    from megatron_csd.training.config_io import load_yaml_text

    try:
        with open(path, encoding="utf-8") as handle:
            tree = load_yaml_text(handle)
    except (OSError, yaml.YAMLError):
        return None  # resume_config.py refuses an unreadable config.yaml of a relaunch in one line
    return tree if isinstance(tree, dict) else None


def resolve_packing_at_start(config: TrainConfig, *, resumes_latest: bool,
                             load_dir: Optional[str] = None) -> PackingChoice:
    """:func:`resolve_packing` for the start of a run (logging rank, in run_guard.guard_run).
    ``load_dir``: the ``iter_*`` checkpoint this run loads, if any: its run's config.yaml is the
    output dir's on a relaunch, else looked for beside its save dir (``RUN/checkpoints/iter_N``
    -> ``RUN/config.yaml``, the default layout)."""
    from megatron_csd.models.builder import uses_te_spec

    resumed = None
    if config.training.packing == "auto":
        if resumes_latest:
            resumed = _resumed_run_config(config.logging.output_dir)
        elif load_dir is not None:
            resumed = _resumed_run_config(os.path.dirname(os.path.dirname(os.path.abspath(load_dir))))
    return resolve_packing(config, use_te=uses_te_spec(config.fp8_teacher), resumed=resumed)


def training_rows(config: TrainConfig, dataset, writer):
    """``dataset`` itself, or its packed bins (printing the padding report) when packing is on."""
    if not packing_enabled(config):
        return dataset
    if config.on_policy.enabled:
        raise ValueError("--packing does not combine with the on-policy options yet (they replace "
                         "responses of single-sample rows): drop --packing or the on_policy options")
    from megatron_csd.data import PackedDataset

    rows = PackedDataset(dataset, seed=config.training.seed)
    writer.print(f"[megatron_csd] {rows.report().line()}")
    return rows
