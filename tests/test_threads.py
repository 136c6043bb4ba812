"""CPU threads: the automatic choice every command makes, and the contention benchmark that shows why."""
import json
import os
import subprocess
import sys

import pytest
import torch

from balora_diffusion import threads
from balora_diffusion.bench.contention import proportional_slowdown


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _large_model():
    # meta tensors: SD 1.5-sized parameter counts without the memory
    return torch.nn.Linear(12_000, 12_000, device="meta")


def test_a_small_model_gets_one_thread_and_a_large_one_torch_default(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert threads.use_cpu_threads(0, [torch.nn.Linear(64, 64)]) == 1
    assert threads.use_cpu_threads(0, [_large_model()]) == threads.torch_default_threads()


def test_an_explicit_count_wins(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.use_cpu_threads(3, [torch.nn.Linear(64, 64)]) == 3


def test_omp_num_threads_set_by_the_user_is_kept(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert threads.use_cpu_threads(0, [torch.nn.Linear(64, 64)]) == 2


def test_the_proportional_slowdown_is_an_even_share_of_the_cores():
    assert proportional_slowdown(busy=1, cores=2) == 1.0  # a core free for each
    assert proportional_slowdown(busy=2, cores=2) == 1.5
    assert proportional_slowdown(busy=3, cores=1) == 4.0


def _balora(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(env, HF_HUB_OFFLINE="1"))


def test_contention_benchmark_quick_runs_the_demo_alone_and_loaded_on_one_thread(tmp_path):
    result = _balora("bench", "contention", "--quick", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "contention.json").read_text())
    assert [(r["setting"], r["busy"]) for r in report["rows"]] == [("auto", 0), ("auto", 1)]
    for row in report["rows"]:
        assert row["cpu_threads"] == 1  # the demo's default, whatever torch's own would be
        assert row["seconds"] > 0 and row["training_steps_per_second"] > 0
        assert row["to_proportional"] == pytest.approx(row["slowdown"] / row["proportional"])
    assert "x fair" in result.stdout
    again = _balora("bench", "contention", "--quick", "--out", "out", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("balora: error: ")
    assert len(again.stderr.splitlines()) == 1 and "--overwrite true" in again.stderr
