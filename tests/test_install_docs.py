"""What a newcomer reads and runs first: CI runs the README's test command, and a tool that needs
the `hf` extra says so in one line instead of a traceback."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(command: str) -> list[str]:
    """A shell command's steps, with `python[3] -m` and pip's --quiet dropped."""
    steps = []
    for step in re.split(r"\s*&&\s*|\n", command):
        step = re.sub(r"^python3? -m ", "", step.strip()).replace(" --quiet", "")
        if step and not step.startswith(("#", "set ", "cd ")):
            steps.append(step)
    return steps


def test_ci_runs_the_readme_quickstart_test_command():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    quickstart = readme[readme.index("## Quickstart"):readme.index("\n## ", readme.index("## Quickstart") + 1)]
    command = re.search(r"# 2\. [^\n]*\n([^\n]+)\n", quickstart).group(1)
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as handle:
        ci = [line for line in handle.read().splitlines()[1:] if not line.startswith("#")]
    assert _steps("\n".join(ci)) == _steps(command) == [
        "pip install torch==2.13.0", "pip install -e '.[test]'", "pytest -q tests"]
    assert "--index-url https://download.pytorch.org/whl/cpu" in quickstart
    assert "python3 -m venv" in quickstart


def test_check_conversion_without_transformers_says_to_install_the_hf_extra(tmp_path):
    code = ("import runpy, sys; sys.modules['transformers'] = None; "
            f"sys.argv = ['check_conversion.py', '--hf-dir', {str(tmp_path)!r}, '--megatron-dir', {str(tmp_path)!r}]; "
            f"runpy.run_path({os.path.join(REPO, 'tools', 'check_conversion.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: tools/check_conversion.py needs transformers; install the "
                                   "hf extra: pip install -e '.[hf]'")
