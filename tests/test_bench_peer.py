"""The peer benchmark's harness: the step probe and `balora bench peer` with a stand-in peer script.

diffusers' DreamBooth script is not shipped with its package (nor torchvision, which it imports), so
the tests give the harness a small script that takes the peer's flags and steps an optimizer; the
real comparison is a measurement (docs/results/loop.md), not a test.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

STAND_IN_PEER = textwrap.dedent("""
    import argparse, torch
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_train_steps", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--instance_data_dir", required=True)
    known, _ = parser.parse_known_args()
    model = torch.nn.Linear(8, known.rank)
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(known.max_train_steps):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
""")

WRAPPED = textwrap.dedent("""
    import sys, torch

    class Wrapper(torch.optim.Optimizer):  # as accelerate's and the update rules' optimizers wrap another
        def __init__(self, inner):
            self.inner = inner
            super().__init__(inner.param_groups, {})

        def step(self, closure=None):
            return self.inner.step(closure)

    model = torch.nn.Linear(4, 4)
    optimizer = Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(int(sys.argv[1])):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    sys.exit(int(sys.argv[2]))
""")


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.mark.parametrize("exit_code", [0, 3])
def test_the_probe_counts_a_wrapped_optimizer_step_once_and_keeps_the_exit_code(tmp_path, exit_code):
    (tmp_path / "wrapped.py").write_text(WRAPPED)
    result = _run(["-m", "balora_diffusion.bench.step_probe", "report.json", "wrapped.py", "7", str(exit_code)],
                  tmp_path)
    assert result.returncode == exit_code, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 7 and report["exit_code"] == exit_code
    assert report["steps_per_second"] > 0 and report["peak_rss_mib"] > 0
    assert report["peak_cuda_mib"] is None  # no CUDA here


def test_bench_peer_quick_measures_both_trainers_with_the_same_probe(tmp_path):
    (tmp_path / "peer.py").write_text(STAND_IN_PEER)
    result = _run(["-m", "balora_diffusion.cli", "bench", "peer", "--peer-script", "peer.py", "--quick",
                   "--ranks", "2", "--out", "out"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "peer.json").read_text())
    (row,) = report["settings"]
    assert (row["rank"], row["precision"], row["gradient_checkpointing"]) == (2, "no", False)
    ours, peer = row["runs"]["ours"][0], row["runs"]["peer"][0]
    assert ours["steps"] == peer["steps"] == report["steps"] == 3  # one probe mark per optimizer step, both
    speed = row["steps_per_second"]
    assert speed["ratio"] == pytest.approx(ours["steps_per_second"] / peer["steps_per_second"])
    assert "steps/s ours" in result.stdout


@pytest.mark.parametrize("flags, fragment", [
    (["--peer-script", "missing.py"], "missing.py"),
    (["--peer-script", "peer.py", "--precisions", "fp16"], "--device cuda"),
    (["--peer-script", "peer.py", "--steps", "1"], "--steps"),
    (["--peer-script", "peer.py", "--method", "bolora"], "bolora"),
])
def test_bench_peer_bad_input_is_one_line(tmp_path, flags, fragment):
    (tmp_path / "peer.py").write_text(STAND_IN_PEER)
    result = _run(["-m", "balora_diffusion.cli", "bench", "peer", *flags], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("balora: error: ")
    assert fragment in result.stderr
