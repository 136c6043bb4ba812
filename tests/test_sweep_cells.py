import json
from pathlib import Path

from balora_diffusion import paths
from balora_diffusion.experiments import sweep as sweep_module
from balora_diffusion.run_layout import CELL_RECORD
from balora_diffusion.experiments.sweep import Cell, SweepConfig


class _Done:
    def __init__(self, record):
        self.record = record

    def done(self):
        return True

    def result(self):
        return self.record


def test_cells_of_two_sweeps_with_the_same_names_keep_their_own_records(tmp_path, monkeypatch):
    """A benchmark runs one sweep per concept together; their cells share names (method, lr, seed)."""
    first, second = tmp_path / "zorb" / "lora-s0", tmp_path / "quax" / "lora-s0"
    first.mkdir(parents=True)
    (first / CELL_RECORD).write_text(json.dumps({"name": "lora-s0", "status": "done", "wall_seconds": 1.0, "folder": "zorb"}))
    cells = [Cell("lora-s0", {}, {"output_dir": str(first)}), Cell("lora-s0", {}, {"output_dir": str(second)})]
    submitted = []

    def submitter(sweep, scoring):
        def submit(cell):
            submitted.append(Path(cell.values["output_dir"]))
            return _Done({"name": "lora-s0", "status": "done", "wall_seconds": 1.0, "folder": "quax"})
        return submit, lambda cancel: None

    monkeypatch.setattr(sweep_module, "_submitter", submitter)
    records = sweep_module.run_cells(SweepConfig(), cells, None)
    assert submitted == [second]
    assert [r["folder"] for r in records] == ["zorb", "quax"]


def test_an_interrupt_sent_to_the_sweep_alone_ends_its_workers_too(random_sd_dir, tmp_path):
    """`kill -INT PID` (or a job scheduler) reaches the sweep's own process only, not its workers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "interrupted"
    sweep = subprocess.Popen([sys.executable, "-m", "balora_diffusion.cli", "sweep", "--set",
                              f"data_dir={paths.DEMO_CONCEPT}", f"base_model={random_sd_dir}", "token=<zorb>",
                              "init_word=heart", "steps=1000000", "eval_every=1000", "checkpoint_every=1000",
                              "batch_size=2", "cpu_threads=1", "--score", "false", "--methods", "lora", "balora",
                              "--lrs", "1", "--workers", "2", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True)
    workers = []
    try:
        while len(workers) < 2 or not all((out / n / "metrics.jsonl").is_file() for n in ("lora-lrx1-s0", "balora-lrx1-s0")):
            assert sweep.poll() is None, sweep.stderr.read()
            workers = [p for p in psutil.Process(sweep.pid).children()
                       if any("multiprocessing.spawn" in part for part in p.cmdline())]
            time.sleep(0.2)
        os.kill(sweep.pid, signal.SIGINT)
        stderr = sweep.communicate(timeout=120)[1]
        gone, alive = psutil.wait_procs(workers, timeout=30)
    finally:
        for p in [sweep, *workers]:
            try:
                p.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
    assert not alive, f"workers still training after the sweep ended: {alive}"
    assert "Traceback" not in stderr, stderr
    assert "run the same command again" in stderr.splitlines()[-1], stderr
