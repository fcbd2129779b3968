"""Lines that every rank prints at once (a run stopping) are written with one write call each."""
import io
import os
import subprocess
import sys

from megatron_csd.parallel import console


class _Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return super().write(text)


def test_say_writes_the_line_and_its_newline_in_one_call(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    console.say("megatron_csd: run stopped: non-finite loss at iteration 3")
    assert recorder.calls == ["megatron_csd: run stopped: non-finite loss at iteration 3\n"]


def _lines_from_concurrent_processes(statement):
    """Eight processes each write 200 long lines through `statement` into one shared pipe."""
    child = f"import sys; from megatron_csd.parallel.console import say\nfor i in range(200): {statement}"
    read_end, write_end = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", child, letter * 300 + " end"], stderr=write_end,
                              stdout=subprocess.DEVNULL) for letter in "abcdefgh"]
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        lines = reader.read().splitlines()
    assert all(proc.wait() == 0 for proc in procs)
    return lines


def test_lines_of_concurrent_processes_never_glue_together():
    lines = _lines_from_concurrent_processes("say(sys.argv[1])")
    assert len(lines) == 8 * 200
    assert all(line == line[0] * 300 + " end" for line in lines)
