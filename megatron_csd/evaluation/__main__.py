"""``python -m megatron_csd.evaluation``: see cli.py."""
import sys

from megatron_csd.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
