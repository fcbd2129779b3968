"""Per-file metrics from the generations of every seed, and their average over files.

Every metric is reported as ``{"mean": m, "std": s, "per_seed": [v_1, ..., v_S]}``: ``v_k`` is
the metric over all prompts of the file for seed k, ``m`` and ``s`` their mean and population
standard deviation (ddof = 0, numpy's default; 0 for a single seed). The teacher-forced
``response_loss`` does not sample, so it is ``{"mean": loss, "std": 0.0}``. A metric that is
undefined (``self_bleu`` with one seed) has ``None`` everywhere.

The ``average`` over files is the unweighted (macro) mean, as papers average their test sets:
per seed k, the mean over files of ``v_k``; then mean and std over seeds as above (so the std
of the average is the seed-to-seed spread of the averaged score).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from megatron_csd.evaluation.diversity import distinct_n, self_bleu
from megatron_csd.evaluation.text_metrics import mean_exact_match, mean_rouge_l

# Keys of a file's "metrics" dict (and of "average"), in table order.
METRIC_NAMES = ("rougeL", "exact_match", "response_loss", "gen_length", "distinct_1",
                "distinct_2", "self_bleu")
SEEDED_METRICS = tuple(name for name in METRIC_NAMES if name != "response_loss")


def mean_std(values: Sequence[Optional[float]]) -> dict:
    """``{"mean", "std", "per_seed"}``; all None when any value is None (undefined metric)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None, "per_seed": [None] * len(values)}
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return {"mean": mean, "std": math.sqrt(var), "per_seed": values}


def seed_metrics(completions: Sequence[str], references: Sequence[str],
                 lengths: Sequence[int]) -> dict:
    """The per-seed metrics of one file (all but self-BLEU, which needs every seed)."""
    return {
        "rougeL": mean_rouge_l(completions, references),
        "exact_match": mean_exact_match(completions, references),
        "gen_length": math.fsum(lengths) / len(lengths),
        "distinct_1": distinct_n(completions, 1),
        "distinct_2": distinct_n(completions, 2),
    }


def file_metrics(completions_by_seed: Sequence[Sequence[str]], references: Sequence[str],
                 lengths_by_seed: Sequence[Sequence[int]], response_loss: Optional[float]) -> dict:
    """``{metric: {"mean", "std", "per_seed"}}`` of one file.

    ``completions_by_seed[k][i]`` is seed k's answer to prompt i, ``lengths_by_seed[k][i]`` its
    number of generated tokens; ``response_loss`` the file's teacher-forced loss (None: skipped).
    """
    per_seed = [seed_metrics(completions, references, lengths)
                for completions, lengths in zip(completions_by_seed, lengths_by_seed)]
    out = {}
    for name in SEEDED_METRICS:
        if name == "self_bleu":
            values = [self_bleu(completions_by_seed, k) for k in range(len(completions_by_seed))]
        else:
            values = [metrics[name] for metrics in per_seed]
        out[name] = mean_std(values)
    out["response_loss"] = ({"mean": None, "std": None} if response_loss is None
                            else {"mean": response_loss, "std": 0.0})
    return {name: out[name] for name in METRIC_NAMES}


def average_metrics(files: Sequence[dict]) -> dict:
    """Macro average over files of their ``file_metrics`` dicts (see module doc)."""
    out = {}
    for name in SEEDED_METRICS:
        columns = [metrics[name]["per_seed"] for metrics in files]
        num_seeds = len(columns[0])
        per_seed = [None if any(col[k] is None for col in columns)
                    else math.fsum(col[k] for col in columns) / len(columns)
                    for k in range(num_seeds)]
        out[name] = mean_std(per_seed)
    losses = [metrics["response_loss"]["mean"] for metrics in files]
    out["response_loss"] = ({"mean": None, "std": None} if any(v is None for v in losses)
                            else {"mean": math.fsum(losses) / len(losses), "std": 0.0})
    return {name: out[name] for name in METRIC_NAMES}
