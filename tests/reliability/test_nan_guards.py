"""Run guards (training/guards.py): non-finite metrics stop every rank; the divergence warning."""
import math

import pytest
import torch

from megatron_csd.training.guards import (DivergenceMonitor, NonFiniteMetricError, check_finite_metrics,
                                          check_finite_parameters)
from tests.spawn import run_distributed


def _record(**values):
    record = {"iteration": 7, "loss": 1.5, "ce": 2.0, "kd": 1.5, "grad_norm": 0.3}
    record.update(values)
    return record


@pytest.mark.parametrize("metric", ["loss", "ce", "kd", "grad_norm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_names_the_metric_and_the_iteration(metric, value):
    with pytest.raises(NonFiniteMetricError, match=rf"non-finite {metric} at iteration 7 \(train: {metric} = "):
        check_finite_metrics(_record(**{metric: value}))


def test_validation_metrics_are_checked_too():
    with pytest.raises(NonFiniteMetricError, match=r"non-finite teacher_ce at iteration 7 \(valid"):
        check_finite_metrics({"iteration": 7, "split": "valid", "loss": 1.0, "ce": 1.0, "teacher_ce": math.nan})


def test_a_grad_norm_megatron_did_not_measure_is_not_an_error():
    # clip_grad = 0, or fp16's loss scaler skipped the step: the optimizer returned None (-> NaN).
    check_finite_metrics(_record(grad_norm=math.nan), grad_norm_measured=False)
    check_finite_metrics(_record())
    with pytest.raises(NonFiniteMetricError, match="non-finite ce"):
        check_finite_metrics(_record(grad_norm=math.nan, ce=math.nan), grad_norm_measured=False)


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(3, 2)
    check_finite_parameters(model, 4)
    with torch.no_grad():
        model.weight[1, 2] = math.inf
    with pytest.raises(NonFiniteMetricError, match="non-finite weights after iteration 4: refusing to save"):
        check_finite_parameters(model, 4)


def _one_rank_sees_nan(rank, world_size):
    record = _record(grad_norm=math.nan if rank == 1 else 0.3)
    with pytest.raises(NonFiniteMetricError, match="non-finite grad_norm at iteration 7"):
        check_finite_metrics(record)
    model = torch.nn.Linear(2, 2)
    if rank == 0:
        with torch.no_grad():
            model.bias[0] = math.nan
    with pytest.raises(NonFiniteMetricError, match="refusing to save"):
        check_finite_parameters(model, 7)
    check_finite_metrics(_record())  # the collectives still line up afterwards


@pytest.mark.slow
def test_every_rank_stops_when_one_rank_sees_a_non_finite_value():
    run_distributed(_one_rank_sees_nan, 2, timeout=120)


def test_divergence_warning_fires_above_k_times_the_running_median(capsys):
    monitor = DivergenceMonitor(10.0)
    for iteration, loss in enumerate([75.0, 74.0, 76.0, 73.0, 75.5, 700.0], start=1):
        assert monitor.observe(iteration, loss) is None  # 700 < 10 x 75
    message = monitor.observe(7, 2.75e6)
    assert message is not None and "iteration 7" in message and "--divergence-warning-factor 10" in message
    assert message in capsys.readouterr().err
    assert monitor.observe(8, 74.0) is None  # training goes on; a normal loss is quiet again


def test_divergence_warning_needs_history_and_can_be_switched_off():
    early = DivergenceMonitor(10.0)
    assert all(early.observe(i, loss) is None for i, loss in enumerate([1.0, 1.0, 1.0, 1.0, 1e9]))
    off = DivergenceMonitor(0.0)
    assert all(off.observe(i, loss) is None for i, loss in enumerate([1.0] * 10 + [1e9]))
    quiet_rank = DivergenceMonitor(10.0, enabled=False)
    assert all(quiet_rank.observe(i, loss) is None for i, loss in enumerate([1.0] * 10 + [1e9]))
