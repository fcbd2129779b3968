"""megatron_csd.evaluation.compare: aggregation over training seeds, table, JSON and plot.

Synthetic results.json trees (the evaluation CLI's format) with known numbers; the statistics
are checked against Python's ``statistics`` module (an independent mean / sample stdev).
"""
from __future__ import annotations

import json
import math
import statistics

import pytest

from megatron_csd.evaluation.compare import COMPARE_METRICS, aggregate, format_markdown, main, write_report
from megatron_csd.evaluation.summary import METRIC_NAMES


def _write_result(path, values: dict) -> None:
    average = {name: {"mean": values.get(name, 1.0), "std": 0.0} for name in METRIC_NAMES}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"settings": {}, "files": {}, "average": average}))


def _scores(method_index: int, seed: int) -> dict:
    return {"rougeL": 20.0 + 3 * method_index + 0.7 * seed ** 2, "exact_match": 1.0 * seed,
            "response_loss": 2.0 - 0.1 * method_index + 0.01 * seed, "distinct_2": 70.0 + seed,
            "self_bleu": 25.0 - seed, "gen_length": 6.0 + 0.1 * seed}


def _tree(root, methods=("fkl", "csd_SS"), seeds=(1, 2, 3), teacher=True):
    for i, method in enumerate(methods):
        for seed in seeds:
            _write_result(root / "eval" / method / f"seed{seed}", _scores(i, seed))
    if teacher:
        _write_result(root / "eval" / "teacher", {"rougeL": 33.0, "response_loss": 1.7})


def test_aggregate_mean_and_sample_std_over_training_seeds(tmp_path):
    _tree(tmp_path)
    report = aggregate(str(tmp_path), ["fkl", "csd_SS"], [1, 2, 3])
    assert list(report["methods"]) == ["fkl", "csd_SS"] and not report["partial"]
    for i, method in enumerate(["fkl", "csd_SS"]):
        entry = report["methods"][method]
        assert entry["num_seeds"] == 3 and entry["seeds"] == [1, 2, 3]
        assert set(entry["metrics"]) == set(COMPARE_METRICS)
        for name in COMPARE_METRICS:
            values = [_scores(i, s)[name] for s in (1, 2, 3)]
            stats = entry["metrics"][name]
            assert stats["per_seed"] == values
            assert stats["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert stats["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert report["teacher"]["rougeL"] == 33.0 and report["teacher"]["response_loss"] == 1.7


def test_missing_seed_is_partial_and_one_seed_has_no_std(tmp_path):
    _tree(tmp_path, methods=("fkl",), seeds=(1,), teacher=False)
    report = aggregate(str(tmp_path), ["fkl"], [1, 2])
    assert report["partial"] and report["missing"] == [str(tmp_path / "eval/fkl/seed2/results.json")]
    stats = report["methods"]["fkl"]["metrics"]["rougeL"]
    assert stats["std"] is None and stats["mean"] == _scores(0, 1)["rougeL"]
    table = format_markdown(report)
    assert "PARTIAL" in table and "| fkl | 1 |" in table and "teacher" not in table


def test_non_finite_score_is_an_error_not_a_number(tmp_path):
    _write_result(tmp_path / "eval/fkl/seed1", {"rougeL": float("nan")})
    with pytest.raises(ValueError, match="rougeL is nan"):
        aggregate(str(tmp_path), ["fkl"], [1])


def test_nothing_to_compare_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    assert main(["--run-dir", str(tmp_path), "--methods", "fkl", "--seeds", "1"]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_report_files_written_and_never_overwritten(tmp_path, capsys):
    _tree(tmp_path)
    assert main(["--run-dir", str(tmp_path), "--methods", "fkl", "csd_SS", "--seeds", "1", "2", "3",
                 "--setting", "student_iters=120", "--setting", "eval_seeds=10 20"]) == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "| method | seeds | accuracy (EM %) | ROUGE-L |" in table
    fkl = [statistics.mean(_scores(0, s)["rougeL"] for s in (1, 2, 3)),
           statistics.stdev(_scores(0, s)["rougeL"] for s in (1, 2, 3))]
    assert f"{fkl[0]:.2f} ± {fkl[1]:.2f}" in table
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["settings"] == {"student_iters": "120", "eval_seeds": "10 20"}
    assert all(math.isfinite(saved["methods"]["csd_SS"]["metrics"][n]["std"]) for n in COMPARE_METRICS)
    png = (tmp_path / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p.name: p.read_bytes() for p in tmp_path.glob("comparison.*")}
    report = aggregate(str(tmp_path), ["fkl"], [1])
    with pytest.raises(ValueError, match="nothing is overwritten"):
        write_report(report, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("comparison.*")} == before
