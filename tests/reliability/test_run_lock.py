"""One writer per output folder (issue 8, item 3).

A real second process holds the folder's lock (``fcntl.flock``): a trainer started on the same
folder fails at start-up on every rank (no rank hangs) with the holder's host and PID, and
writes nothing. A lock file left behind by a killed holder does not block.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.reliability.helpers import env, sft_config
from tests.spawn import run_distributed
from tests.test_training_common import build_workspace

_HOLDER = ("import sys, time\n"
           "from megatron_csd.training.run_lock import RunLock\n"
           "lock = RunLock().acquire([sys.argv[1]])\n"
           "print('locked', flush=True)\n"
           "time.sleep(600)\n")


def _start_holder(directory: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, directory], env=env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_locker_names_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    from megatron_csd.training.run_lock import LOCK_FILE, OutputDirBusyError, RunLock

    holder = _start_holder(str(tmp_path))
    try:
        with pytest.raises(OutputDirBusyError) as info:
            RunLock().acquire([str(tmp_path / "elsewhere"), str(tmp_path)])
        message = str(info.value)
        assert f"host {socket.gethostname()} pid {holder.pid}" in message and "\n" not in message
        again = RunLock().acquire([str(tmp_path / "elsewhere")])  # all or nothing: it was dropped
        assert again.held
        again.release()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()  # left behind by the killed holder
    lock = RunLock().acquire([str(tmp_path)])
    assert lock.held and f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
    lock.release()


def _second_trainer(rank, world_size, workspace, output_dir, holder_pid, out_dir):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    try:
        run_training(sft_config(workspace, output_dir, train_iters=2, global_batch_size=2))
        outcome = "trained"
    except ValueError as err:
        outcome = f"{type(err).__name__}: {err}"
    finally:
        destroy_parallel()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(outcome)


@pytest.mark.slow
def test_second_trainer_on_a_locked_folder_fails_on_every_rank(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    output_dir = str(tmp_path / "run")
    holder = _start_holder(output_dir)
    try:
        run_distributed(_second_trainer, 2, workspace, output_dir, holder.pid, str(tmp_path),
                        timeout=240)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert outcome.startswith("RunRefusedError: ") and f"pid {holder.pid}" in outcome, outcome
        assert socket.gethostname() in outcome and "new --output-dir" in outcome
    assert os.listdir(output_dir) == ["megatron_csd.lock"]  # no metrics, config or checkpoints
