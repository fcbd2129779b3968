"""The training rows of a run: the prepared samples, or (``training.packing``) packed bins.

Packing is a data-side choice plus a model-side capability: model_setup makes the models
follow per-sample positions and refuses layer specs that cannot isolate samples; here the
dataset becomes a ``PackedDataset`` (seeded by ``training.seed``) and the start-up report gives
the padding fraction before and after packing. Evaluation stays unpacked (one sample per row).
"""
from __future__ import annotations

from megatron_csd.training.config import TrainConfig


def training_rows(config: TrainConfig, dataset, writer):
    """``dataset`` itself, or its packed bins (printing the padding report) when packing is on."""
    if not config.training.packing:
        return dataset
    if config.on_policy.enabled:
        raise ValueError("--packing does not combine with the on-policy options yet (they replace "
                         "responses of single-sample rows): drop --packing or the on_policy options")
    from megatron_csd.data import PackedDataset

    rows = PackedDataset(dataset, seed=config.training.seed)
    writer.print(f"[megatron_csd] {rows.report().line()}")
    return rows
