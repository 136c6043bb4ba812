"""How long the app makes you wait: the Compare grid cold (the base model's load and every image
drawn), cached, and cached after a restart of the app; and a training started from the Train tab
until its first samples are shown. Run from a source checkout:

    python -m app.timing --runs DIR [--fusion 1] [--seeds 1] [--steps 20] [--cpu-threads 1] \
        [--sample-every 10] [--out docs/results/app.md]

The grid draws every finished run in DIR (rows = learning rate, columns = method) into a fresh,
temporary cache, so the runs folder's own cache is neither used nor changed; the training trains
the shipped concept in a temporary runs folder with the Train tab's starting values, and is
stopped once its first samples are there. With --out the results are written as a page.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from balora_diffusion.app.app import SAMPLE_POLL_SECONDS, App
from balora_diffusion.app.training import newest_samples
from balora_diffusion.atomic import atomic_path
from balora_diffusion.run_layout import SUMMARY

POLL_SECONDS = 0.1


def timed_grid(app: App, names: list[str], prompt: str, args) -> float:
    started = time.perf_counter()
    app.compare(names, "learning rate", "method", prompt, "", args.seeds, args.steps, args.guidance, args.fusion)
    return time.perf_counter() - started


def grid_timings(args) -> dict:
    """Seconds of the base model's load, and of the grid uncached, cached and cached after a restart."""
    with tempfile.TemporaryDirectory() as cache:
        def fresh_app() -> App:
            app = App(args.runs, args.base_model, cpu_threads=args.cpu_threads)
            app.engine.cache = Path(cache)
            return app

        app = fresh_app()
        names = app.finished()
        prompt = args.prompt or app.default_prompt()
        print(f"{len(names)} runs x fusion {args.fusion} x seeds {args.seeds}, {args.steps} steps: {prompt!r}")
        started = time.perf_counter()
        with app.engine.lock:
            app.engine.pipeline()
        found = {"runs": len(names), "prompt": prompt, "load": time.perf_counter() - started}
        found["uncached"] = timed_grid(app, names, prompt, args)
        found["cached"] = timed_grid(app, names, prompt, args)
        started = time.perf_counter()
        restarted = fresh_app()
        found["restart"] = time.perf_counter() - started
        found["restarted"] = timed_grid(restarted, names, prompt, args)
    for key, label in [("load", "base model load (once per app)"), ("uncached", "grid, nothing cached"),
                       ("cached", "grid, cached"), ("restarted", "grid, cached, after a restart of the app")]:
        print(f"{label + ':':42s}{found[key]:.3f} s")
    return found


def first_samples(args) -> dict:
    """Seconds from pressing Train (the uploads checked, the process started) to its first logged
    step and to its first samples (the validation grid at step --sample-every)."""
    from balora_diffusion import paths

    with tempfile.TemporaryDirectory() as root:
        app = App(Path(root) / "runs", args.base_model, cpu_threads=args.cpu_threads)
        uploads = sorted(p for p in paths.DEMO_CONCEPT.iterdir() if p.suffix in (".png", ".txt"))
        d = app.defaults
        started = time.perf_counter()
        job = app.train(uploads, "timing", d["token"][0], d["init_word"], d["method"], d["lr_unet"], d["lr_text"],
                        max(d["steps"], 2 * args.sample_every), d["rank"], sample_every=args.sample_every)
        first_step = None
        try:
            while job.running() and newest_samples(job.folder) is None:
                if first_step is None and job.step() >= 1:
                    first_step = time.perf_counter() - started
                time.sleep(POLL_SECONDS)
            samples = time.perf_counter() - started
            if newest_samples(job.folder) is None:
                sys.exit(f"the training ended before its first samples: {job.outcome()}")
            app.stop()
            job.process.wait(timeout=600)
        finally:
            if job.running():
                job.process.kill()
    print(f"training start to first step:             {first_step:.3f} s")
    print(f"training start to first samples (step {args.sample_every}): {samples:.3f} s")
    return {"first_step": first_step, "samples": samples, "method": d["method"], "batch": d["batch_size"],
            "fusion": d["fusion"], "seeds": d["grid_seeds"], "sample_steps": d["sample_steps"]}


def machine(args) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        models = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    threads = args.cpu_threads or "automatic"
    return (f"{os.cpu_count()} CPU cores ({models[0] if models else cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, torch threads: {threads} (`--cpu-threads {args.cpu_threads}`)")


def sweep_made(runs: Path) -> str:
    """How a `balora sweep` made the runs, from its summary.json; "" where the runs are no sweep."""
    import json

    try:
        sweep = json.loads((runs / SUMMARY).read_text(encoding="utf-8"))["protocol"]["sweep"]
        return (f" The runs are a `balora sweep --config {sweep['config']} --set {' '.join(sweep['set'])} --methods "
                f"{' '.join(sweep['methods'])} --lrs {' '.join(map(str, sweep['lrs']))} --seeds "
                f"{' '.join(map(str, sweep['seeds']))}` (its summary.json).")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def page(command: str, where: str, load: tuple[float, float], grid: dict, train: dict, args) -> str:
    cold = grid["load"] + grid["uncached"]
    return f"""# How long the app makes you wait

Written by

```bash
{command}
```

on {where}. One-minute load average {load[0]:.2f} at the start and {load[1]:.2f} at the end (1 per busy
core: above the core count, other processes shared the cores and the times are upper bounds).

## Compare: a grid of {grid['runs']} runs

Every finished run of `{args.runs}` (rows = learning rate, columns = method), prompt
`{grid['prompt']}`, fusion coefficient(s) {args.fusion}, seed(s) {args.seeds}, {args.steps} sampling steps,
guidance {args.guidance:g}, drawn into a fresh temporary cache: the first grid draws every image
(each adapter swapped in once); "after a restart" is a new app over the same cache.{sweep_made(args.runs)}

| | seconds |
|---|---|
| base model load (once per app) | {grid['load']:.2f} |
| grid, nothing cached | {grid['uncached']:.2f} |
| **cold: load + grid** | **{cold:.2f}** |
| grid, cached | {grid['cached']:.3f} |
| app restart (new app over the same cache) | {grid['restart']:.3f} |
| grid, cached, after a restart of the app | {grid['restarted']:.3f} |

A cached grid is file reads and the labelling: its time does not depend on the model.

## Train: from pressing Train to the first samples

The shipped concept's images and captions uploaded, the Train tab's starting values ({train['method']},
batch {train['batch']}), samples every {args.sample_every} steps: the validation grid of fusion
coefficients {', '.join(f'{w:g}' for w in train['fusion'])} x seeds {', '.join(map(str, train['seeds']))} at
{train['sample_steps']} sampling steps, which the page shows as soon as it is written (the page
looks every {SAMPLE_POLL_SECONDS:g} s, not counted here).

| | seconds |
|---|---|
| uploads checked, `balora train` started, to its first logged step | {train['first_step']:.2f} |
| to its first samples (step {args.sample_every}) | {train['samples']:.2f} |
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app.timing", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--base-model", default="")
    parser.add_argument("--prompt", default="", help="default: the first finished run's validation prompt")
    parser.add_argument("--fusion", default="1")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument("--sample-every", type=int, default=10, help="the training's sample interval, in steps")
    parser.add_argument("--out", type=Path, help="write the results as this Markdown page")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "app.timing", *sys.argv[1:]])
    where = machine(args)
    load_start = os.getloadavg()[0]
    grid = grid_timings(args)
    train = first_samples(args)
    load = (load_start, os.getloadavg()[0])
    print(f"{where}; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(page(command, where, load, grid, train, args), encoding="utf-8")
        print(f"page: {args.out}")


if __name__ == "__main__":
    main()
