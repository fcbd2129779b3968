"""Metric functions against hand-worked values and independent re-implementations."""
from __future__ import annotations

import math

import pytest

from megatron_csd.evaluation import (average_metrics, distinct_n, exact_match, file_metrics,
                                     mean_exact_match, mean_rouge_l, mean_std, normalize_answer,
                                     rouge_l, self_bleu, sentence_bleu)


def _lcs(a: list, b: list) -> int:
    """Textbook O(|a||b|) dynamic programme (independent of rouge-score's implementation)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _f(lcs: int, pred_len: int, ref_len: int) -> float:
    p, r = lcs / pred_len, lcs / ref_len
    return 2 * p * r / (p + r) if lcs else 0.0


def test_rouge_l_matches_hand_worked_lcs():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4 of 6 and 6.
    assert _lcs("the cat sat on the mat".split(), "the cat lay on a mat".split()) == 4
    assert rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3, abs=1e-12)
    # Case and punctuation are ignored by the tokenizer; identical text scores 1, disjoint 0.
    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("", "anything") == 0.0


def test_rouge_l_uses_the_stemmer():
    # Stems: "the dog are run" vs "the dog run": LCS 3, precision 3/3, recall 3/4.
    pred, ref = "the dog runs", "the dogs are running"
    assert rouge_l(pred, ref) == pytest.approx(_f(3, 3, 4), abs=1e-12)
    # Without stemming only "the" would match (LCS 1): the stemmer is on.
    assert _f(_lcs(pred.split(), ref.split()), 3, 4) == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))


def test_mean_rouge_l_is_100_times_the_mean():
    preds = ["the cat lay on a mat", "the dog runs", "x"]
    refs = ["the cat sat on the mat", "the dogs are running", "y"]
    expected = 100 * (2 / 3 + _f(3, 3, 4) + 0.0) / 3
    assert mean_rouge_l(preds, refs) == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        mean_rouge_l(["a", "b"], ["a"])


def test_exact_match_is_squad_normalised():
    assert normalize_answer("  The  Capital, of France!  ") == "capital of france"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("Paris.", "paris") and exact_match("the answer", "Answer")
    assert not exact_match("Paris is it", "Paris")
    assert mean_exact_match(["Paris.", "Rome", "42"], ["paris", "Madrid", " 42 "]) == pytest.approx(200 / 3)


def test_distinct_n_on_a_small_known_set():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> 3 unique / 6; bigrams: (a b)(b a)(a b) + (a c) -> 3 unique / 4
    assert distinct_n(texts, 1) == pytest.approx(100 * 3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(100 * 3 / 4)
    assert distinct_n(["a", "b"], 2) == 0.0  # no bigram at all (n-grams never cross answers)
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_sentence_bleu_matches_the_formula():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped precisions 5/6, 3/5,
    # 2/4, 1/3, equal lengths (brevity penalty 1): BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert sentence_bleu("the cat sat on the mat", ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-9)


def test_self_bleu_per_prompt_across_seeds():
    a, b = "the cat sat on the mat", "the cat sat on a mat"
    pair = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25  # symmetric for this pair
    by_seed = [[a, "x y z w"], [b, "x y z w"]]  # prompt 2: identical answers -> 100
    assert self_bleu(by_seed, 0) == pytest.approx((pair + 100) / 2, abs=1e-9)
    assert self_bleu(by_seed, 1) == pytest.approx((pair + 100) / 2, abs=1e-9)
    assert self_bleu([[a, b]], 0) is None  # one seed: undefined
    three = [["p q r s"], ["p q r s"], ["k l m n"]]  # seed 0 vs {seed 1, seed 2}: one exact ref
    assert self_bleu(three, 0) == pytest.approx(100.0)
    assert self_bleu(three, 2) == pytest.approx(0.0)


def test_mean_std_is_population_std_and_propagates_undefined_and_nan():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "per_seed": [1.0, 3.0]}
    assert mean_std([5.0])["std"] == 0.0
    assert mean_std([1.0, None])["mean"] is None
    assert math.isnan(mean_std([1.0, float("nan")])["mean"])


def test_file_metrics_and_average_over_files():
    refs = ["paris", "four"]
    file1 = file_metrics([["Paris", "five"], ["paris", "four"]], refs, [[1, 1], [1, 3]], 2.0)
    assert file1["exact_match"] == {"mean": 75.0, "std": 25.0, "per_seed": [50.0, 100.0]}
    assert file1["gen_length"]["per_seed"] == [1.0, 2.0]
    assert file1["response_loss"] == {"mean": 2.0, "std": 0.0}
    assert file1["rougeL"]["per_seed"] == [50.0, 100.0]
    file2 = file_metrics([["a"], ["b"]], ["a"], [[4], [6]], 4.0)
    avg = average_metrics([file1, file2])
    assert avg["exact_match"]["per_seed"] == [75.0, 50.0]  # per seed: mean over the two files
    assert avg["exact_match"]["mean"] == 62.5 and avg["exact_match"]["std"] == 12.5
    assert avg["response_loss"] == {"mean": 3.0, "std": 0.0}
    assert avg["gen_length"]["per_seed"] == [2.5, 4.0]
    one_seed = file_metrics([["a"]], ["a"], [[1]], None)
    assert one_seed["self_bleu"]["mean"] is None and one_seed["response_loss"]["mean"] is None
    assert average_metrics([one_seed])["self_bleu"]["mean"] is None
