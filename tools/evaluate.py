#!/usr/bin/env python
"""Evaluate a checkpoint on named instruction test files (thin wrapper of
``python -m megatron_csd.evaluation``; see README "Evaluation" and ``--help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_csd.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
