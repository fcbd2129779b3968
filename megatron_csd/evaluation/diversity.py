"""Diversity of sampled answers: distinct-n and self-BLEU.

distinct-n (Li et al., 2016) over a set of generations G (one file, one seed):

    distinct_n = |{unique n-grams over all g in G}| / (total number of n-grams over all g in G)

with whitespace tokens (case kept) and n-grams never crossing two generations; x100. A set with
no n-gram at all (every answer shorter than n tokens) has distinct-n 0.

self-BLEU measures how alike the answers sampled for the SAME prompt under different seeds are
(high = little diversity). For seed s of a file,

    self_bleu_s = mean over prompts i of BLEU(answer[i, s], references = {answer[i, t] : t != s})

with sacrebleu's sentence BLEU (13a tokenizer, 4-grams, exp smoothing, effective order, x100).
This is the per-prompt form of Zhu et al.'s (2018) self-BLEU -- each generation scored against
the others of its group -- with the group being the seeds of one prompt rather than the whole
corpus (which would mix in topic differences between prompts and cost O(N^2) references). It
needs at least two seeds; with one seed it is undefined (None).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """100 x unique n-grams / all n-grams over ``texts`` (whitespace tokens); 0 without n-grams."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(text.split(), n)
        total += len(grams)
        seen.update(grams)
    return 100.0 * len(seen) / total if total else 0.0


@lru_cache(maxsize=1)
def _bleu():
    try:
        from sacrebleu.metrics import BLEU
    except ImportError as err:
        raise ImportError("evaluation needs the 'sacrebleu' package: pip install sacrebleu "
                          "(a dependency of megatron_csd)") from err
    return BLEU(effective_order=True)


def sentence_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """sacrebleu sentence BLEU (0-100) of one hypothesis against one or more references."""
    return _bleu().sentence_score(hypothesis, list(references)).score


def self_bleu(answers_by_seed: Sequence[Sequence[str]], seed_index: int) -> Optional[float]:
    """Self-BLEU of seed ``seed_index``: ``answers_by_seed[s][i]`` is seed s's answer to prompt i.

    Mean over prompts of BLEU(answer of this seed, the other seeds' answers to the same prompt);
    None with fewer than two seeds.
    """
    num_seeds = len(answers_by_seed)
    if num_seeds < 2:
        return None
    num_prompts = len(answers_by_seed[0])
    if any(len(answers) != num_prompts for answers in answers_by_seed) or num_prompts == 0:
        raise ValueError("every seed needs an answer for every prompt (and at least one prompt)")
    total = 0.0
    for i in range(num_prompts):
        others = [answers_by_seed[t][i] for t in range(num_seeds) if t != seed_index]
        total += sentence_bleu(answers_by_seed[seed_index][i], others)
    return total / num_prompts
