"""Workers die with their launcher: a torchrun worker must not outlive a ``kill -9`` of torchrun.

torchrun (torch.distributed.run) starts the workers as child processes and stops them itself
on SIGTERM/SIGINT, but a SIGKILL gives it no chance: the orphaned workers used to go on
training and writing checkpoints after the user saw exit 137. ``die_with_launcher()``, called
first thing in a worker entry point, arranges for the worker to be killed when its parent dies:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes. The kernel then sends SIGKILL
  when the parent (the thread of torchrun that started us) exits. The parent may already
  have died between our start and the prctl call; the signal would then never come, so the
  parent PID is compared with the one read before the call, and the worker exits at once
  when it changed.
- elsewhere (or when prctl is unavailable): a daemon thread polls ``os.getppid()`` once a
  second and kills the process when the parent changes (the orphan is re-parented).

SIGKILL, not SIGTERM: a training step may not return to the interpreter for a long time,
and checkpoints are written atomically (a killed save leaves only ``iter_N.tmp`` debris).
It only acts for processes started by torchrun (``TORCHELASTIC_RUN_ID`` set), so that
``nohup python -m megatron_csd.training.cli ...`` outlives its shell as usual.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

from .console import say

PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 1.0


def launched_by_torchrun(environ=os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ


def _set_pdeathsig(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False when unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(_POLL_SECONDS):
        if os.getppid() != parent:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def die_with_launcher(*, force: bool = False) -> Optional[str]:
    """Make this process exit when its parent dies; returns the mechanism used (None: off).

    Acts only under torchrun unless ``force``. Call it before any slow import.
    """
    if not (force or launched_by_torchrun()):
        return None
    parent = os.getppid()
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    if _set_pdeathsig(kill):
        mechanism = "prctl"
    else:
        threading.Thread(target=_watch_parent, args=(parent,), name="launcher-watchdog",
                         daemon=True).start()
        mechanism = "watchdog"
    if os.getppid() != parent:  # the launcher died before we were armed
        say("megatron_csd: the launcher (torchrun) is gone; exiting")
        os._exit(1)
    return mechanism
