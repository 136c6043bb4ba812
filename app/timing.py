"""How long the Compare grid takes: the base model's load, the grid with nothing cached, cached,
and cached after a restart of the app. Run from a source checkout:

    python -m app.timing --runs DIR [--fusion 1] [--seeds 1] [--steps 20] [--cpu-threads 1]

It draws every finished run in DIR (rows = learning rate, columns = method) into a fresh,
temporary cache, so the runs folder's own cache is neither used nor changed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from balora_diffusion.app.app import App


def timed_grid(app: App, names: list[str], prompt: str, args) -> float:
    started = time.perf_counter()
    app.compare(names, "learning rate", "method", prompt, "", args.seeds, args.steps, args.guidance, args.fusion)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m app.timing", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--base-model", default="")
    parser.add_argument("--prompt", default="", help="default: the first run's validation prompt")
    parser.add_argument("--fusion", default="1")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cpu-threads", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        def fresh_app() -> App:
            app = App(args.runs, args.base_model, cpu_threads=args.cpu_threads)
            app.engine.cache = Path(cache)
            return app

        app = fresh_app()
        names = app.finished()
        prompt = args.prompt or app.list_runs()[0]["prompt"]
        print(f"{len(names)} runs x fusion {args.fusion} x seeds {args.seeds}, {args.steps} steps: {prompt!r}")
        started = time.perf_counter()
        with app.engine.lock:
            app.engine.pipeline()
        print(f"base model load (once per app):           {time.perf_counter() - started:.2f} s")
        print(f"grid, nothing cached (adapters, images):  {timed_grid(app, names, prompt, args):.2f} s")
        print(f"grid, cached:                             {timed_grid(app, names, prompt, args):.3f} s")
        print(f"grid, cached, after a restart of the app: {timed_grid(fresh_app(), names, prompt, args):.3f} s")


if __name__ == "__main__":
    main()
