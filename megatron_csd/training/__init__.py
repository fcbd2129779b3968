"""megatron_csd.training: config tree, teacher/student pipeline stage, loss_func, train loop, checkpoints.

    from megatron_csd.training import parse_config, run_training
    result = run_training(parse_config(["--config", "run.yaml"]))   # on every rank (torchrun)

Command line: ``torchrun ... -m megatron_csd.training.cli`` (see examples/distill_gemma.sh).
"""
from megatron_csd.training.config import TrainConfig, check_world_size
from megatron_csd.training.config_io import config_from_dict, parse_config, save_resolved_config
from megatron_csd.training.trainer import Trainer, TrainResult, run_training

__all__ = ["TrainConfig", "TrainResult", "Trainer", "check_world_size", "config_from_dict",
           "parse_config", "run_training", "save_resolved_config"]
