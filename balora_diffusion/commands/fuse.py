"""`balora fuse`: several concept adapters in one, every token kept, written as a run folder
(adapter/ and kohya/ as a training writes them, run.json for the app, fuse.json with each layer's
condition number and truncation loss), so generate / export / merge / inspect / the app take it as
they take a trained run."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag, claim

DEFAULT_MAX_RANK = 128
DEFAULT_STEPS = 10
DEFAULT_RIDGE = 1e-4


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _ridge(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.fusion import METHODS

    parser.epilog = ("Example: balora fuse --adapter runs/zorb --adapter runs/quax --out runs/zorb+quax; then "
                     "balora generate --adapter runs/zorb+quax --prompt 'a <zorb> on a blue background'")
    parser.add_argument("--adapter", action="extend", nargs="+", required=True, metavar="PATH[:WEIGHT]",
                        help="run folder, checkpoint or LoRA file with its own token, at its weight (default 1); "
                             "two or more")
    parser.add_argument("--out", type=Path, required=True, help="the new run folder")
    parser.add_argument("--method", choices=METHODS, default="gradient",
                        help="gradient: each layer's update that best keeps every concept's own outputs on its own "
                             "inputs (Mix-of-Show's gradient fusion, in closed form); sum: the updates added "
                             "(default gradient)")
    parser.add_argument("--rank", type=_positive, default=None,
                        help="cut every layer's update to this rank by SVD (default: keep it whole, at most the "
                             "sum of the adapters' ranks)")
    parser.add_argument("--max-rank", type=_positive, default=DEFAULT_MAX_RANK,
                        help="the largest rank accepted without --rank: every concept adds its rank, and the file "
                             f"and each draw grow with it (default {DEFAULT_MAX_RANK})")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="gradient: prompts, one a line; each concept is drawn with the lines naming its token "
                             "(default: its run's concept.toml eval_prompts, else its captions)")
    parser.add_argument("--steps", type=_positive, default=DEFAULT_STEPS,
                        help=f"gradient: sampling steps per prompt while layer inputs are recorded (default "
                             f"{DEFAULT_STEPS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="gradient: sampling seeds (default 1)")
    parser.add_argument("--ridge", type=_ridge, default=DEFAULT_RIDGE,
                        help="gradient: each layer's Gram G gets ridge * trace(G) / width on its diagonal "
                             f"(default {DEFAULT_RIDGE:g})")
    parser.add_argument("--base-model", default="", help="diffusers folder or single-file .safetensors the "
                                                         "adapters were trained on; default: the shipped tiny model")
    parser.add_argument("--base-config", default="", help="for a single-file base model: its config folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_overwrite_flag(parser, "the run folder at --out")


def _prompt_lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in path.expanduser().read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the prompts file {path}: {exc}") from None


def read_concepts(specs: list[tuple[str, float]], method: str, *, max_rank: int, rank: int | None,
                  lines: list[str] | None):
    """The fusion.Concept of every (path, weight), checked to fuse into one, with the prompts gradient
    fusion draws it with: before the base model's slow load, so that a refusal comes at once."""
    from balora_diffusion.formats.read import read_adapter
    from balora_diffusion.fusion import Concept, check_concepts, concept_prompts

    concepts = [Concept(f"{path}:{weight:g}", read_adapter(path), weight, []) for path, weight in specs]
    check_concepts(concepts, max_rank, rank)
    if method == "gradient":
        for (path, _), concept in zip(specs, concepts):
            concept.prompts = concept_prompts(Path(path).expanduser(), concept.adapter, lines)
    return concepts


def write_fused(pipe, concepts: list, specs: list[tuple[str, float]], out: Path, method: str, *, rank: int | None,
                ridge: float, steps: int, seeds: list[int], started: float):
    """Fuse `concepts` on `pipe` into the run folder `out` (written whole or not at all); the fused
    Adapter, the per-layer report and the seconds since `started`."""
    from balora_diffusion.atomic import atomic_path, write_json_atomic
    from balora_diffusion.formats.run_files import write_run_adapters
    from balora_diffusion.fusion import fuse_concepts
    from balora_diffusion.generate import DEFAULT_GUIDANCE
    from balora_diffusion.run_layout import FUSE_RECORD, RUN
    from balora_diffusion.train import library_versions
    from balora_diffusion.versions import installed_version

    first = concepts[0].adapter.info
    info = {"name": out.name, "method": f"fuse-{method}", "token": [t for c in concepts for t in c.adapter.tokens],
            "fused": [c.label for c in concepts], "toolkit_version": installed_version("balora-diffusion") or "unknown",
            **{key: first[key] for key in ("base_model", "base_model_hash") if key in first}}
    adapter, report = fuse_concepts(pipe, concepts, method, rank=rank, info=info, ridge=ridge,
                                    steps=steps, seeds=seeds, guidance=DEFAULT_GUIDANCE)
    seconds = time.perf_counter() - started
    singular, losses = _singular_and_losses(report)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_run_adapters(tmp, adapter)
        write_json_atomic(tmp / FUSE_RECORD, {
            "method": method, "rank": rank, "ridge": ridge if method == "gradient" else None,
            "adapters": [{"path": str(Path(p).expanduser().resolve()), "weight": w, "tokens": c.adapter.tokens,
                          "prompts": c.prompts} for (p, w), c in zip(specs, concepts)],
            "sampling": {"steps": steps, "seeds": seeds} if method == "gradient" else None,
            "singular_layers": singular, "max_truncation_loss": max(losses), "seconds": seconds,
            "layers": report, "versions": library_versions()})
        # what the app lists a run by: its tokens, and one prompt per concept to draw it with
        write_json_atomic(tmp / RUN, {"method": info["method"], "config": {
            "token": adapter.tokens, "rank": adapter.info["rank"], "method": info["method"],
            "grid_prompts": [c.prompts[0] for c in concepts if c.prompts]}})
    return adapter, report, seconds


def _singular_and_losses(report: list[dict]) -> tuple[list[str], list[float]]:
    return ([entry["layer"] for entry in report if entry.get("singular")],
            [entry["truncation_loss"] for entry in report])


def describe_fused(concepts: list, adapter, report: list[dict], method: str, out: Path, seconds: float) -> str:
    """The line `balora fuse` prints: what was fused into where, its rank and how well the cut kept it."""
    singular, losses = _singular_and_losses(report)
    regularised = f"; {len(singular)} layer(s) with a singular Gram, regularised" if singular else ""
    return (f"fused {len(concepts)} adapters ({method}) into {out}: tokens {' '.join(adapter.tokens)}, rank "
            f"{adapter.info['rank']}, largest truncation loss {max(losses):.3g}{regularised} ({seconds:.1f} s)")


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.commands.generate import adapter_spec

    out = args.out.expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if any(s < 0 or s >= 2**63 for s in args.seeds):
        raise UserError("--seeds must lie between 0 and 2^63-1")
    specs = [adapter_spec(text) for text in args.adapter]
    for path, _ in specs:
        if not Path(path).expanduser().exists():
            raise UserError(f"adapter not found: {path}")
    claim([out], args.overwrite)
    lines = _prompt_lines(args.prompts_file) if args.method == "gradient" else None

    from balora_diffusion.models import load_pipeline
    from balora_diffusion.threads import use_cpu_threads

    concepts = read_concepts(specs, args.method, max_rank=args.max_rank, rank=args.rank, lines=lines)
    started = time.perf_counter()
    pipe = load_pipeline(args.base_model or None, device=args.device, single_file_config=args.base_config or None)
    use_cpu_threads(0, [pipe.unet, pipe.text_encoder, pipe.vae])
    adapter, report, seconds = write_fused(pipe, concepts, specs, out, args.method, rank=args.rank, ridge=args.ridge,
                                           steps=args.steps, seeds=args.seeds, started=started)
    print(describe_fused(concepts, adapter, report, args.method, out, seconds))
    return 0
