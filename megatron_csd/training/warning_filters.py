"""Known-harmless upstream warnings, silenced narrowly by the command-line entry points.

Megatron-Core and torch print a dozen warnings per rank on every run that say nothing about
the user's run: Transformer Engine / Apex not installed (both optional GPU extras; Megatron
falls back to its local PyTorch implementations), deprecations inside Megatron-Core's own
calls (``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor`` in its tensor-
parallel mappings, ``load_state_dict`` and torch's ``ShardedTensor`` in its checkpoint loader),
and, on a CPU run, advice about ``CUDA_DEVICE_MAX_CONNECTIONS``. They hide the warnings that do
matter, so :func:`install_known_warning_filters` ignores exactly those messages (by category and
message regex) and :func:`announce_missing_gpu_extras` prints one line instead when TE/Apex
are absent.

Only entry points call it (``training/cli.py``, ``tools/*.py``): importing the library never
changes the process's warning filters. Every other warning, the project's own included, still
shows.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

# (category, regex matched against the start of the message); keep each one specific.
KNOWN_UPSTREAM_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated\."),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated\."),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions\. "
                    r"Please use `load` instead\."),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor\."),
)
# Only meaningful on GPUs: filtered on CPU runs only.
CPU_ONLY_WARNINGS = (
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment "
                  r"variable CUDA_DEVICE_MAX_CONNECTIONS"),
)

OPTIONAL_EXTRAS_NOTE = ("megatron_csd: {missing} not installed: optional GPU extras (the NGC "
                        "PyTorch container has both); using Megatron-Core's PyTorch fallbacks.")


def missing_gpu_extras() -> list[str]:
    """Names of the optional GPU extras (Transformer Engine, Apex) that do not import here."""
    missing = []
    for module, name in (("transformer_engine", "Transformer Engine"), ("apex", "Apex")):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def install_known_warning_filters(*, cpu_run: bool) -> None:
    """Ignore the known-harmless upstream warnings listed above (call from entry points only).

    `cpu_run`: also ignore the GPU-only advice (``CUDA_DEVICE_MAX_CONNECTIONS``).
    """
    filters = KNOWN_UPSTREAM_WARNINGS + (CPU_ONLY_WARNINGS if cpu_run else ())
    for category, message in filters:
        warnings.filterwarnings("ignore", message=message, category=category)


def announce_missing_gpu_extras() -> None:
    """One line on stderr, on global rank 0 only (``RANK``), when TE or Apex is absent."""
    if os.environ.get("RANK", "0") != "0":
        return
    missing = missing_gpu_extras()
    if missing:
        print(OPTIONAL_EXTRAS_NOTE.format(missing=" and ".join(missing)), file=sys.stderr)
