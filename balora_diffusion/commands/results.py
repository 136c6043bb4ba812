"""`balora results`: regenerate the results page from the benchmarks' outputs, running what is missing;
with --sweep, the same kind of page for a sweep of one's own."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from balora_diffusion.atomic import atomic_path
from balora_diffusion.outputs import add_overwrite_flag, claim

PAGE = "results.md"
CONCEPT_DIR, SYNTHETIC_DIR = Path("runs/bench/concept"), Path("runs/bench/synthetic")
# the page's figures, copied from the benchmark folders: (folder key, file there, name in OUT/img)
FIGURES = (("concept", "concept.png", "concept.png"), ("concept", "grid.png", "concept-grid.png"),
           ("synthetic", "synthetic.png", "synthetic.png"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help=f"folder of the page: writes OUT/{PAGE} and its figures in OUT/img/ (the repository's "
                             "docs/); with --sweep, the page file itself (its grid is written beside it)")
    parser.add_argument("--sweep", type=Path, default=None,
                        help="a `balora sweep` folder: write its page instead (verdicts robust to the learning rate, "
                             "faster, follows the prompt for each method against the sweep's lora cells, from its "
                             "summary.json; trains nothing)")
    for bench, default in (("concept", CONCEPT_DIR), ("synthetic", SYNTHETIC_DIR)):
        parser.add_argument(f"--{bench}", type=Path, default=default,
                            help=f"folder of `balora bench {bench}` (run there first if it has no {bench}.json; "
                                 "default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="run missing benchmarks at their --quick size (a smoke test of the page, not results)")
    add_overwrite_flag(parser, "the page and its figures (and the files of a benchmark left unfinished)")


def _ensure(folder: Path, name: str, run) -> dict:
    if not (folder / name).is_file():
        run()
    return json.loads((folder / name).read_text())


def _sweep_page(args: argparse.Namespace) -> int:
    from balora_diffusion.experiments.results import read_sweep_summary, render_sweep_page
    from balora_diffusion.errors import UserError
    from balora_diffusion.run_layout import GRID, SUMMARY

    summary_file = args.sweep / SUMMARY
    if not summary_file.is_file():
        raise UserError(f"--sweep {args.sweep}: no {SUMMARY} there (a `balora sweep` writes it when its cells are "
                        "done; run the sweep, or rerun it to finish it)")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder: with --sweep, --out is the page file, e.g. "
                        f"{args.out / 'results.md'}")
    try:
        summary = read_sweep_summary(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--sweep {args.sweep}: {SUMMARY} is not a sweep's summary ({exc})") from None
    methods = {c["labels"]["method"] for c in summary["cells"] if c}
    if "lora" not in methods:
        raise UserError(f"--sweep {args.sweep}: the verdicts compare each method with plain LoRA, and the sweep has "
                        f"no lora cells (methods: {', '.join(sorted(methods))}); add lora to its --methods")
    page, grid = args.out, args.out.with_name(f"{args.out.stem}-grid.png")
    has_grid = (args.sweep / GRID).is_file()
    claim([page, *([grid] if has_grid else [])], args.overwrite)
    command = f"balora results --sweep {args.sweep} --out {args.out}"
    if has_grid:
        with atomic_path(grid) as tmp:
            shutil.copyfile(args.sweep / GRID, tmp)
    with atomic_path(page) as tmp:
        tmp.write_text(render_sweep_page(str(args.sweep), summary, command, grid.name if has_grid else None),
                       encoding="utf-8")
    print(f"wrote {page}" + (f" and {grid}" if has_grid else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.sweep is not None:
        return _sweep_page(args)
    from balora_diffusion.bench import concept as concept_bench
    from balora_diffusion.bench import synthetic as synthetic_bench
    from balora_diffusion.bench.methods import METHOD_SPECS
    from balora_diffusion.experiments.results import render_page

    claim([args.out / PAGE, *(args.out / "img" / target for _, _, target in FIGURES)], args.overwrite)
    quick = " --quick" if args.quick else ""
    synthetic = _ensure(args.synthetic, "synthetic.json", lambda: synthetic_bench.run(argparse.Namespace(
        out=args.synthetic, quick=args.quick, seeds=None, methods=list(METHOD_SPECS), overwrite=args.overwrite)))
    protocol = json.loads((args.synthetic / "synthetic_protocol.json").read_text())
    concept = _ensure(args.concept, "concept.json", lambda: concept_bench.run_bench(
        concept_bench.QUICK if args.quick else concept_bench.FULL, args.concept))
    commands = {"page": f"balora results --out {args.out}{quick} --overwrite true",
                "concept": f"balora bench concept --out {args.concept}{quick}",
                "synthetic": f"balora bench synthetic --out {args.synthetic}{quick}"}
    table = (args.concept / "concept.md").read_text(encoding="utf-8")
    for key, name, target in FIGURES:
        source = (args.concept if key == "concept" else args.synthetic) / name
        with atomic_path(args.out / "img" / target) as tmp:
            shutil.copyfile(source, tmp)
    with atomic_path(args.out / PAGE) as tmp:
        tmp.write_text(render_page(synthetic, protocol, concept, table, commands), encoding="utf-8")
    print(f"wrote {args.out / PAGE} and its figures in {args.out / 'img'}")
    return 0
