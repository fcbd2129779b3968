"""metrics.jsonl writer: one JSON record per line, only on the logging rank, TensorBoard optional."""
from __future__ import annotations

import json

from megatron_csd.training.metrics import MetricsWriter


def test_metrics_are_json_lines_and_tensorboard_is_optional(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True, quiet=False, resume=False)
    writer.log({"split": "train", "iteration": 1, "loss": 2.5, "lr": 1e-4}, console="iter 1")
    writer.log({"split": "valid", "iteration": 1, "ce": 3.0})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"split": "train", "iteration": 1, "loss": 2.5, "lr": 1e-4},
        {"split": "valid", "iteration": 1, "ce": 3.0}]
    out = capsys.readouterr()
    assert "iter 1" in out.out
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:
        assert "TensorBoard requested but unavailable" in out.err
    else:
        assert (tmp_path / "tensorboard").is_dir()
    # A new (non-resumed) run keeps the previous file aside instead of appending to it.
    MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, quiet=True, resume=False).log({"iteration": 0})
    assert (tmp_path / "metrics.jsonl.previous").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_non_logging_ranks_write_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "run"), enabled=False, tensorboard=True, quiet=False, resume=False)
    writer.log({"iteration": 1})
    assert not (tmp_path / "run").exists()
