"""Command-line entry point: ``torchrun ... -m megatron_csd.training.cli [--config X.yaml] [flags]``.

Bad configuration exits with status 2 and a one-line message (no stack trace), as do a busy
output folder, a save dir holding another run and a damaged checkpoint; a run stopped by a
non-finite metric, NaN logits in generation (on-policy / eval-generate) or a failed checkpoint
write exits with status 1 and one line; the resolved
config, metrics and checkpoints land under ``--output-dir`` / ``--save``. Known-harmless upstream
warnings are filtered here (``warning_filters``), not at library import. Under torchrun the
worker exits when torchrun dies (parallel/launcher_guard.py).
"""
from __future__ import annotations

import sys

from megatron_csd.parallel.console import say


def main(argv=None) -> int:
    from megatron_csd.parallel.launcher_guard import die_with_launcher

    die_with_launcher()  # first: a kill -9 of torchrun must not leave this worker training
    import torch

    from megatron_csd.training.warning_filters import (
        announce_missing_gpu_extras,
        install_known_warning_filters,
    )

    install_known_warning_filters(cpu_run=not torch.cuda.is_available())
    from megatron_csd.training.config_io import parse_config

    try:
        config = parse_config(argv)
    except (ValueError, TypeError) as err:
        say(f"megatron_csd: configuration error: {err}")
        return 2
    announce_missing_gpu_extras()
    from megatron_csd.generation.errors import GenerationError
    from megatron_csd.training.guards import NonFiniteMetricError
    from megatron_csd.training.save_failure import CheckpointSaveError
    from megatron_csd.training.trainer import run_training

    try:
        run_training(config)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Start-up checks (layout, vocab, tokenizer, data) raise these with a message that
        # says what to change; a stack trace would only hide it.
        say(f"megatron_csd: error: {err}")
        return 2
    except (NonFiniteMetricError, GenerationError, CheckpointSaveError) as err:  # every rank stops, status 1
        say(f"megatron_csd: run stopped: {err}")
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing's async writer spawns processes
    sys.exit(main())
