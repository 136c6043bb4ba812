"""Run a training program under a probe that times its optimizer steps and reads its memory.

    python -m balora_diffusion.bench.step_probe REPORT.json -m MODULE ARGS...
    python -m balora_diffusion.bench.step_probe REPORT.json SCRIPT.py ARGS...

Any trainer that steps a torch optimizer is measured the same way, from the inside, without
reading its logs: torch's global optimizer-step hooks mark the end of every step (a step of an
optimizer that wraps another, as accelerate's and the update rules' do, counts once), after a
device synchronisation. The report gives the steps' rate from the first to the last step (the
first step's compilation and warm-up left out), the peak CUDA memory of the steps after the first
(what the optimizer state and one step's activations need, without the loading before or the
saving and validation after), and the process's peak RSS.
"""
from __future__ import annotations

import json
import resource
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


class StepProbe:
    def __init__(self):
        self.depth = 0
        self.times: list[float] = []
        self.peak_cuda = 0

    def install(self) -> None:
        register_optimizer_step_pre_hook(self._before)
        register_optimizer_step_post_hook(self._after)

    def _before(self, optimizer, args, kwargs) -> None:
        self.depth += 1

    def _after(self, optimizer, args, kwargs) -> None:
        self.depth -= 1
        if self.depth:
            return  # the inner optimizer of a wrapper: its step ends with the wrapper's
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            if self.times:  # the first step's peak holds the loading's leftovers, not the step's need
                self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self.times.append(time.perf_counter())

    def report(self, exit_code: int) -> dict:
        steps = len(self.times)
        span = self.times[-1] - self.times[0] if steps > 1 else 0.0
        return {"exit_code": exit_code, "steps": steps,
                "steps_per_second": (steps - 1) / span if span > 0 else None,
                "peak_cuda_mib": self.peak_cuda / 2**20 if self.peak_cuda else None,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def main(argv: list[str]) -> int:
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    report_path = Path(argv[0])
    probe = StepProbe()
    probe.install()
    code = 0
    try:
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc)
    report_path.write_text(json.dumps(probe.report(code)) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
