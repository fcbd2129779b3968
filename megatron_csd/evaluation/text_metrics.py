"""Reference-based answer metrics: ROUGE-L F and exact match.

ROUGE-L (Lin, 2004) of a prediction P against a reference R, both tokenized into words:

    LCS = length of the longest common subsequence of the two token lists
    precision = LCS / |P|,  recall = LCS / |R|,  F = 2 * precision * recall / (precision + recall)

We use the `rouge-score` package exactly as MiniLLM / DistiLLM (and so the CSD paper) report it:
``RougeScorer(["rougeL"], use_stemmer=True)`` -- its tokenizer lowercases, replaces every
non-alphanumeric character by a space and Porter-stems tokens longer than 3 characters -- and
the F-measure is averaged over the prompts of a file and multiplied by 100. An empty prediction
or reference scores 0.

Exact match is SQuAD's: both strings are normalised (lowercase, punctuation removed, the
articles a / an / the removed, whitespace collapsed) and compared for equality; the file score
is the percentage of matches. It is meaningful for short-answer sets (the toy data, S-NI-style
classification), much less so for free-form Dolly answers, where it is near 0.
"""
from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def _missing(package: str, pip_name: str) -> ImportError:
    return ImportError(f"evaluation needs the '{package}' package: pip install {pip_name} "
                       "(a dependency of megatron_csd)")


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise _missing("rouge-score", "rouge-score") from err
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] of one prediction against one reference (stemming on)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """100 x the mean ROUGE-L F over aligned (prediction, reference) pairs."""
    _check_aligned(predictions, references)
    return 100.0 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def mean_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after :func:`normalize_answer`."""
    _check_aligned(predictions, references)
    return 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def _check_aligned(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
