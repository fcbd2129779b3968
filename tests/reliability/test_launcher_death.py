"""Workers die with their launcher (issue 8, item 4).

A real ``python -m torch.distributed.run --nproc-per-node 2`` run of the trainer (tiny model,
many iterations, a checkpoint every 2) is killed with SIGKILL once it has saved; both workers
must be gone within 10 s (they used to go on training and saving), and no checkpoint may
appear afterwards.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.reliability.helpers import cli_args, env
from tests.spawn import free_port
from tests.test_training_common import build_workspace


def _children(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _published(save_dir: str) -> list:
    return sorted(n for n in os.listdir(save_dir) if n.startswith("iter_") and not n.endswith(".tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_torchrun_takes_the_workers_down(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    output_dir = str(tmp_path / "run")
    save_dir = os.path.join(output_dir, "checkpoints")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_csd.training.cli",
               *cli_args(workspace, output_dir, train_iters=100000, save_interval=2,
                         global_batch_size=2)]
    launcher = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 300
        while not os.path.isfile(os.path.join(save_dir, "latest")):
            assert launcher.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        killed_at = time.time()
        while any(_alive(pid) for pid in workers) and time.time() - killed_at < 10:
            time.sleep(0.2)
        survivors = [pid for pid in workers if _alive(pid)]
        assert not survivors, f"workers {survivors} outlived torchrun by 10 s"
        published = _published(save_dir)
        time.sleep(3)
        assert _published(save_dir) == published
    finally:
        for pid in [launcher.pid] + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
