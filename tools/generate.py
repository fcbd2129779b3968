#!/usr/bin/env python
"""Generate completions for a JSONL file with a Megatron checkpoint at any TP/PP (see
megatron_csd/generation/cli.py for the flags, input and output formats):

    python tools/generate.py --load CKPT --input IN.jsonl --output OUT.jsonl --greedy \
        --max-new-tokens 64 --device cpu --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    torchrun --nproc-per-node 2 tools/generate.py ... --tensor-model-parallel-size 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # guard: dist_checkpointing may spawn helper processes
    from megatron_csd.generation.cli import main

    sys.exit(main())
