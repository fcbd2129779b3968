"""One-line messages from processes that share a console (the ranks of one torchrun)."""
from __future__ import annotations

import sys


def say(line: str) -> None:
    """Write `line` and its newline to stderr in one write call, then flush.

    print() writes the text and the newline separately, so when two ranks stop at the same
    moment their lines can come out glued together ("... with --loadmegatron_csd: run stopped:
    ..."). One write of a line shorter than the pipe buffer (4 KiB) is never interleaved.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
