"""The entry points' warning filters: Megatron-Core's real import-time noise (TE/Apex missing)
and the other known messages are silenced, a genuine new warning still shows, importing the
library changes no filter, and the TE/Apex note is one line on rank 0 only.
(The full list is checked against a real run's stderr in tests/test_examples.py.)"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import sys, warnings
import megatron_csd.training.warning_filters as wf
if sys.argv[1] == "filtered":
    wf.install_known_warning_filters(cpu_run=True)
    wf.announce_missing_gpu_extras()
import megatron.core.optimizer  # warns at import when TE/Apex are absent
import megatron.core.models.gpt.gpt_layer_specs
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use x", FutureWarning)
warnings.warn("When using async grad allreduce it is recommended to set the environment "
              "variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning)
warnings.warn("a genuine new warning about this run", UserWarning)
warnings.warn("Transformer Engine and Apex are not installed. Falling back to x", DeprecationWarning)
"""


def _run(mode, rank="0"):
    env = dict(os.environ, PYTHONPATH=REPO, RANK=rank, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def missing_extras():
    from megatron_csd.training.warning_filters import missing_gpu_extras

    missing = missing_gpu_extras()
    if "Apex" not in missing:
        pytest.skip("Apex is installed: Megatron-Core emits no fallback warnings to filter")
    return missing


def test_known_upstream_noise_is_filtered_and_genuine_warnings_still_show(missing_extras):
    unfiltered, filtered = _run("plain"), _run("filtered")
    assert "Apex is not installed" in unfiltered  # the noise is real without the filters
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in unfiltered
    for noise in ("Apex is not installed", "Transformer Engine and Apex are not installed. Falling back",
                  "all_gather_into_tensor", "CUDA_DEVICE_MAX_CONNECTIONS"):
        assert noise not in filtered.replace("Transformer Engine and Apex are not installed. "
                                             "Falling back to x", ""), noise
    assert "UserWarning: a genuine new warning about this run" in filtered
    # Narrow: the same text under another category is not swallowed.
    assert "DeprecationWarning: Transformer Engine and Apex are not installed. Falling back to x" in filtered
    note = f"{' and '.join(missing_extras)} not installed: optional GPU extras"
    assert filtered.count(note) == 1 and note not in unfiltered


def test_note_is_printed_on_rank_zero_only(missing_extras):
    assert "optional GPU extras" not in _run("filtered", rank="1")


def test_importing_the_library_installs_no_filter():
    code = ("import warnings\n"
            "import megatron_csd.training.cli, megatron_csd.training.trainer\n"
            "import megatron_csd.conversion.megatron_to_hf\n"
            "from megatron_csd.training.warning_filters import KNOWN_UPSTREAM_WARNINGS as known\n"
            "ours = {m for _, m in known}\n"
            "assert not [f for f in warnings.filters if f[1] is not None and f[1].pattern in ours]\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
