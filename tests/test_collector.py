"""The collector pauses while the ML libraries import and skips them afterwards and at exit.
Each check runs in a fresh interpreter: the test process has imported everything long ago."""
import subprocess
import sys

import pytest


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_libraries_objects_are_frozen_once_and_the_collector_runs_again():
    result = python(
        "import gc\n"
        "from balora_diffusion.collector import libraries_loading\n"
        "with libraries_loading():\n"
        "    assert not gc.isenabled()\n"
        "    import diffusers, torch\n"
        "first = gc.get_freeze_count()\n"
        "assert gc.isenabled()\n"
        "with libraries_loading():\n"
        "    assert gc.isenabled()  # a second command in the same process: nothing new to import\n"
        "print(first, gc.get_freeze_count())\n")
    assert result.returncode == 0, result.stderr
    first, second = map(int, result.stdout.split())
    assert first > 100_000  # torch and diffusers alone make a few hundred thousand objects
    assert second == first


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["no-such-command"], 2)])
def test_the_executable_exits_with_mains_code_and_its_objects_frozen(argv, code):
    # the last atexit handler to run is the first registered: it sees the state the interpreter finalizes
    result = python(
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
        f"sys.argv = ['balora', *{argv!r}]\n"
        "from balora_diffusion.cli import entry\n"
        "entry()\n")
    assert result.returncode == code
    frozen = [line for line in result.stderr.splitlines() if line.startswith("frozen ")]
    assert len(frozen) == 1 and int(frozen[0].split()[1]) > 0, result.stderr
