"""`balora bench contention`: the main job alone and beside busy processes, per thread setting.

A user's machine is rarely idle. This runs `balora demo` (training the shipped concept, then
drawing it) as a whole process, first alone, then beside K processes that each keep one core busy,
once per thread setting: `auto` (what every command does by default) and `per-core` (torch's own
default, one thread per core, through OMP_NUM_THREADS). It prints each run's time, the slowdown
against the same setting alone, and that slowdown against the proportional one, (K + 1) / cores
(the share of the machine a one-thread process gets when the cores are split evenly): near 1 means
the process gets its fair share, far above it means it falls off a cliff.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.run_layout import RUN

SETTINGS = ("auto", "per-core")
QUICK = {"busy": 1, "settings": ["auto"]}
# the demo's config cut to a smoke test: two steps, every drawing one sampling step
QUICK_CONFIG = """steps = 2
eval_every = 2
heldout_size = 2
grid_seeds = [1]
fusion = [1.0]
sample_steps = 1
"""
BUSY_LOOP = "while True:\n    pass\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.outputs import add_overwrite_flag

    parser.add_argument("--out", type=Path, required=True, help="folder to write contention.json into")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the loaded runs (default 2)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS, metavar="SETTING",
                        help="thread settings to compare: auto (the default of every command) and per-core "
                             "(torch's own default); default both")
    parser.add_argument("--steps", default=None, help="training steps of the demo (default: the demo's own)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size: {QUICK['busy']} busy process, auto threads only, a two-step "
                             "demo that draws with one seed and one sampling step")
    add_overwrite_flag(parser, "an earlier contention.json in --out")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def proportional_slowdown(busy: int, cores: int) -> float:
    """How much slower a one-thread process runs beside `busy` one-thread processes when the cores
    are shared evenly: not at all while a core is free for each."""
    return max(1.0, (busy + 1) / cores)


class BusyProcesses:
    """`count` processes that each keep one core busy until the block ends."""

    def __init__(self, count: int):
        self.count, self.processes = count, []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)
                          for _ in range(self.count)]
        time.sleep(0.5)  # let the scheduler see them as running before the timed command starts
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


def quick_config(folder: Path) -> Path:
    from balora_diffusion.paths import config_file

    path = folder / "quick.toml"
    path.write_text(f"extends = {str(config_file('demo'))!r}\n" + QUICK_CONFIG)
    return path


def demo_command(folder: Path, steps: str | None, quick: bool) -> list[str]:
    return [sys.executable, "-m", "balora_diffusion.cli", "demo", "--output-dir", str(folder), "--overwrite", "true",
            *(["--steps", steps] if steps else []),
            *(["--config", str(quick_config(folder.parent)), "--seeds", "1"] if quick else [])]


def timed_demo(folder: Path, setting: str, steps: str | None, quick: bool) -> dict:
    """Run the demo once; its wall time, the training loop's steps/s and the threads it used."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if setting == "per-core":
        env["OMP_NUM_THREADS"] = str(cores())
    log = folder.with_suffix(".log")
    with log.open("w") as out:
        start = time.perf_counter()
        result = subprocess.run(demo_command(folder, steps, quick), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"the demo failed with exit {result.returncode}: {tail[0]}")
    run = json.loads((folder / RUN).read_text())
    return {"seconds": seconds, "training_steps_per_second": run["training_steps_per_second"],
            "cpu_threads": run.get("cpu_threads")}


def measure(settings: list[str], busy: int, steps: str | None, quick: bool, work: Path) -> list[dict]:
    rows = []
    for setting in settings:
        for load in (0, busy):
            with BusyProcesses(load):
                run = timed_demo(work / f"{setting}-{load}", setting, steps, quick)
            rows.append({"setting": setting, "busy": load, **run})
            print(f"demo, {setting} threads ({run['cpu_threads']}), beside {load} busy process(es): "
                  f"{run['seconds']:.1f} s", flush=True)
    return rows


def summarise(rows: list[dict], n_cores: int) -> list[dict]:
    alone = {r["setting"]: r for r in rows if r["busy"] == 0}
    for row in rows:
        base = alone[row["setting"]]
        row["slowdown"] = row["seconds"] / base["seconds"]
        row["proportional"] = proportional_slowdown(row["busy"], n_cores)
        row["to_proportional"] = row["slowdown"] / row["proportional"]
        row["training_slowdown"] = base["training_steps_per_second"] / row["training_steps_per_second"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'threads':<14}{'busy':>5}{'demo s':>9}{'slowdown':>10}{'fair':>7}{'x fair':>8}"
            f"{'train steps/s':>15}{'train slowdown':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting'] + ' (' + str(r['cpu_threads']) + ')':<14}{r['busy']:>5}{r['seconds']:>9.1f}"
                     f"{r['slowdown']:>9.2f}x{r['proportional']:>6.2f}x{r['to_proportional']:>7.2f}x"
                     f"{r['training_steps_per_second']:>15.2f}{r['training_slowdown']:>15.2f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.atomic import write_json_atomic
    from balora_diffusion.bench.outputs import claim_out
    from balora_diffusion.config import parse_flag
    from balora_diffusion.train_config import TrainConfig

    busy, settings, steps = args.busy, args.settings, args.steps
    if args.quick:
        busy, settings = QUICK["busy"], QUICK["settings"]
    if busy < 1:
        raise UserError(f"--busy must be >= 1, got {busy}")
    if steps is not None:
        parse_flag(TrainConfig, "steps", steps, "--steps")
    claim_out(args, ("contention.json",))
    n_cores = cores()
    with tempfile.TemporaryDirectory(prefix="balora-bench-contention-") as tmp:
        rows = summarise(measure(settings, busy, steps, args.quick, Path(tmp)), n_cores)
    print(format_table(rows))
    print(f"{n_cores} core(s), {platform.processor() or platform.machine()}; busy processes each spin one core; "
          "fair = (busy + 1) / cores, the slowdown of an even share")
    target = write_json_atomic(args.out / "contention.json", {
        "cores": n_cores, "busy": busy, "steps": steps, "quick": args.quick, "python": platform.python_version(),
        "rows": rows})
    print(f"wrote {target}")
    return 0
