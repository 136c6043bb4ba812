"""`balora bench agreement`: do the field's CLIP metrics rank a sweep's cells as the toy world's pixel
scores do?

Every cell of a sweep of a world concept (a run folder whose concept has a concept.toml) is drawn on
its concept's evaluation prompts by `balora eval`'s own code (commands.eval.evaluate), and the same
images are scored four ways: CLIP-T and CLIP-I with a CLIP (the shipped world CLIP unless --clip),
and the world's prompt adherence and concept fidelity read from pixels. Over the cells it gives the
Spearman rank correlation of CLIP-T with adherence and of CLIP-I with fidelity, and where they
saturate: the correlation over the lower and the upper half of the cells by the world score, and how
many cells sit at the world score's ceiling, where it can no longer rank them.

It also gives the time the metrics add to a cell here, and, computed from model shapes (no GPU, no
weights: the models are built on the meta device and their forward passes' flops counted), what
CLIP ViT-L/14 adds to a cell of SD 1.5 drawn at 512 px.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np

from balora_diffusion.run_layout import CELL_RECORD, SUMMARY

PAIRS = (("clip-t", "adherence"), ("clip-i", "fidelity"))
# The other way round: a CLIP-T that follows fidelity as closely as adherence reads the concept, not its context.
CROSS = (("clip-t", "fidelity"), ("clip-i", "adherence"))
METRICS = ["clip-t", "clip-i", "fidelity", "adherence"]
CEILING = 0.95  # a world score at or above this is at its ceiling: the cells there are not told apart
# How each cell is drawn: the demo config's sampling (guidance 5, 20 steps), two seeds, full strength.
FULL = dict(seeds=[1, 2], steps=20, guidance=5.0, fusion=[1.0])
QUICK = dict(seeds=[1], steps=2, guidance=5.0, fusion=[1.0])
# CLIP ViT-L/14's image tower (openai/clip-vit-large-patch14); its text tower is sd15_shapes' text encoder.
VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=768)
SD15_RESOLUTION = 512


def ranks(values) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        out[tied] = out[tied].mean()
    return out


def spearman(x, y) -> float | None:
    """Spearman's rank correlation; None with fewer than three pairs or a constant side (no ranking)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    rx, ry = ranks([a for a, _ in pairs]), ranks([b for _, b in pairs])
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def analyse(cells: list[dict]) -> dict:
    """Per pair (CLIP metric, world score): rho over every cell, over the lower and upper half of the
    cells by the world score, the cells at the world score's ceiling, and each score's range."""
    out = {}
    for clip_metric, world_metric in PAIRS + CROSS:
        scored = [c for c in cells if c[clip_metric] is not None and c[world_metric] is not None]
        by_world = sorted(scored, key=lambda c: c[world_metric])
        half = len(by_world) // 2
        lower, upper = by_world[:half], by_world[len(by_world) - half:]

        def rho(group):
            return spearman([c[clip_metric] for c in group], [c[world_metric] for c in group])

        def spread(metric):
            values = [c[metric] for c in scored]
            return {"min": min(values), "max": max(values)} if values else None

        out[f"{clip_metric} vs {world_metric}"] = {
            "clip": clip_metric, "world": world_metric, "cross": (clip_metric, world_metric) in CROSS,
            "cells": len(scored), "rho": rho(scored),
            "rho_lower_half": rho(lower), "rho_upper_half": rho(upper), "half": half,
            "at_ceiling": sum(c[world_metric] >= CEILING for c in scored),
            "range": {clip_metric: spread(clip_metric), world_metric: spread(world_metric)}}
    return out


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def sd15_cost(images: int, sampling_steps: int, guidance: bool, training_steps: int, batch_size: int) -> dict:
    """Forward flops of SD 1.5 and CLIP ViT-L/14, counted on models built on the meta device, and what a
    cell spends: drawing `images` at 512 px, CLIP-T and CLIP-I of them, and training (a backward pass
    taken as twice its forward, the usual estimate)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from balora_diffusion import paths
    from balora_diffusion.bench.sd15_shapes import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG

    latent = SD15_RESOLUTION // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(paths.SD15_CONFIG / "vae"))
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14_VISION))
        tokens = torch.zeros(1, 77, dtype=torch.long)
        per = {"unet_call": _flops(lambda: unet(torch.zeros(1, 4, latent, latent), 10, torch.zeros(1, 77, 768))),
               "vae_decode": _flops(lambda: vae.decode(torch.zeros(1, 4, latent, latent))),
               "vae_encode": _flops(lambda: vae.encode(torch.zeros(1, 3, SD15_RESOLUTION, SD15_RESOLUTION))),
               "text_encoder": _flops(lambda: text(input_ids=tokens)),
               "clip_image": _flops(lambda: vision(pixel_values=torch.zeros(1, 3, 224, 224)))}
    calls = 2 if guidance else 1
    drawing = images * (sampling_steps * calls * per["unet_call"] + per["vae_decode"] + calls * per["text_encoder"])
    # CLIP-T: every image and its prompt's text; CLIP-I: the same image embeddings against the references'
    metrics = images * (per["clip_image"] + per["text_encoder"])
    # the LoRA'd UNet and text encoder forward and backward; the VAE only encodes, without gradients
    training = training_steps * batch_size * (3 * (per["unet_call"] + per["text_encoder"]) + per["vae_encode"])
    return {"per_forward": per, "images": images, "sampling_steps": sampling_steps, "training_steps": training_steps,
            "batch_size": batch_size, "cell": {"drawing": drawing, "metrics": metrics, "training": training}}


def _cell_record(run: Path | None) -> dict:
    path = run / CELL_RECORD if run else None
    if path and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {}


def measure(sweep: Path, draw: dict, clip: str) -> dict:
    from balora_diffusion.commands.eval import EvalConfig, evaluate
    from balora_diffusion.concept_eval import run_config

    cfg = EvalConfig(metrics=list(METRICS), clip=clip, **draw)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    done = evaluate(cfg, [sweep])
    cells = []
    for entry, result in zip([e for e in done.entries for _ in cfg.fusion], done.results):
        record, config = _cell_record(entry.run), run_config(entry.run) if entry.run else {}
        cells.append({"cell": entry.label, **{m: result[m] for m in METRICS}, "seconds": result["seconds"],
                      "images": len(result["images"]),
                      # a resumed cell's record holds only the steps after its resumption
                      "training_seconds": record.get("training_seconds") if record.get("resumed_from") is None
                      else None,
                      "training_steps": config.get("steps"), "batch_size": config.get("batch_size")})
    subjects = list(done.subjects.values())
    return {"sweep": str(sweep), "cells": cells, "analysis": analyse(cells),
            "clip": done.models["clip"].source, "clip_load_seconds": done.load_seconds.get("clip"),
            "draw": {**draw, "scheduler": cfg.scheduler}, "prompts": subjects[0].prompts,
            "concepts": sorted({str(s.folder) for s in subjects}), "wall_seconds": time.perf_counter() - started,
            "load_average": [load_before, os.getloadavg()[0]]}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def timing(result: dict) -> dict:
    """Mean seconds per cell: drawing, each metric, and the training the sweep spent on the cell."""
    cells = result["cells"]
    out = {name: _mean([c["seconds"].get(name) for c in cells]) for name in ["draw", *METRICS]}
    out["training"] = _mean([c["training_seconds"] for c in cells])
    return out


def verdict(row: dict) -> str:
    rho = row["rho"]
    if rho is None:
        return "no ranking (fewer than three cells, or one score constant over them)"
    strength = "strong" if abs(rho) >= 0.7 else "moderate" if abs(rho) >= 0.4 else "weak"
    return f"{strength} {'agreement' if rho > 0 else 'disagreement'} (rho {rho:+.2f} over {row['cells']} cells)"


def page(result: dict, figure: str | None = None) -> str:
    from balora_diffusion import paths

    t, cost = timing(result), result["sd15"]
    clip_name = ("the shipped world CLIP (`assets/world-clip`)" if Path(result["clip"]) == paths.WORLD_CLIP
                 else f"`{result['clip']}`")
    lines = [f"# Do CLIP-T and CLIP-I agree with the world's scores?", "",
             f"Written by `{result['command']}` on the sweep made by", "", f"    {result['sweep_command']}", "",
             f"Each of the {len(result['cells'])} cells (run folders in `{result['sweep']}`) is drawn by `balora eval`'s "
             f"own code on its concept's {len(result['prompts'])} evaluation prompts, seeds "
             f"{' '.join(map(str, result['draw']['seeds']))}, {result['draw']['scheduler']} "
             f"{result['draw']['steps']} steps, guidance {result['draw']['guidance']:g}, full strength; the same "
             f"images get CLIP-T and CLIP-I from {clip_name} and the world's prompt adherence and concept "
             "fidelity from their pixels (`balora_diffusion.scoring`, `balora_diffusion.concept`).", "",
             "## Rank correlation over the cells", "",
             "| pair | cells | Spearman rho | rho, lower half by world score | rho, upper half | "
             f"cells at the world score's ceiling (>= {CEILING:g}) | verdict |", "|---|---|---|---|---|---|---|"]
    for name, row in result["analysis"].items():
        lines.append(f"| {name}{' (cross-check)' if row['cross'] else ''} | {row['cells']} | {_fmt(row['rho'], '+.2f')} | {_fmt(row['rho_lower_half'], '+.2f')} "
                     f"({row['half']}) | {_fmt(row['rho_upper_half'], '+.2f')} ({row['half']}) | {row['at_ceiling']} | "
                     f"{verdict(row)} |")
    lines += ["", "Ranges over the cells: " + "; ".join(
        f"{metric} {_fmt(r['min'], '.3f')} to {_fmt(r['max'], '.3f')}"
        for row in result["analysis"].values() if not row["cross"] for metric, r in row["range"].items() if r) + ".", "",
        "A correlation that holds over the lower half and fades over the upper half is where a metric "
        "saturates: it tells a failed cell from a working one but not two working ones apart. Cells at "
        "the world score's ceiling cannot be ranked by it at all; a half whose world scores are all equal has "
        "no rho (-). The cross-checks pair each CLIP metric with the other world score: a CLIP-T that follows "
        "fidelity as closely as adherence measures whether the concept is drawn more than whether its "
        "context is.", "", "## Per cell", "",
        "| cell | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for c in result["cells"]:
        lines.append(f"| {c['cell']} | " + " | ".join(_fmt(c[m], ".3f") for m in METRICS) + " |")
    if figure:
        lines += ["", f"![CLIP-T against adherence, CLIP-I against fidelity, one point per cell]({figure})"]
    lines += ["", "## Time the metrics add to a cell", "",
              f"Measured here ({result['hardware']}; load average {result['load_average'][0]:.1f} before and "
              f"{result['load_average'][1]:.1f} after on {os.cpu_count()} cores: other work shared them, so these seconds "
              "are upper bounds), mean seconds per cell of "
              f"{result['cells'][0]['images'] if result['cells'] else 0} images with the tiny models; the "
              f"CLIP loads once per sweep ({_fmt(result['clip_load_seconds'])} s):", "",
              "| training (the sweep's, cells trained in one go) | drawing | CLIP-T | CLIP-I | fidelity | adherence |", "|---|---|---|---|---|---|",
              f"| {_fmt(t['training'], '.1f')} | {_fmt(t['draw'], '.2f')} | {_fmt(t['clip-t'], '.3f')} | "
              f"{_fmt(t['clip-i'], '.3f')} | {_fmt(t['fidelity'], '.3f')} | {_fmt(t['adherence'], '.3f')} |", ""]
    clip_seconds = (t["clip-t"] or 0.0) + (t["clip-i"] or 0.0)
    if t["training"]:
        lines += [f"CLIP-T and CLIP-I add {clip_seconds:.2f} s to a cell whose images are drawn anyway (as the "
                  f"sweep's pixel scores draw theirs), {100 * clip_seconds / t['training']:.2f} % of its "
                  f"{t['training']:.0f} s; drawing the evaluation images for them as well adds "
                  f"{clip_seconds + (t['draw'] or 0.0):.1f} s "
                  f"({100 * (clip_seconds + (t['draw'] or 0.0)) / t['training']:.1f} %).", ""]
    shares = cost["cell"]
    total = shares["drawing"] + shares["training"]
    per = cost["per_forward"]
    lines += ["SD 1.5 with CLIP ViT-L/14 on a GPU: **computed, not measured** (no GPU here). Forward flops "
              "counted on the models built from their shapes on the meta device: UNet call at 512 px "
              f"{per['unet_call'] / 1e9:.0f} GFLOP, VAE decode {per['vae_decode'] / 1e9:.0f} GFLOP, text encoder "
              f"{per['text_encoder'] / 1e9:.1f} GFLOP, ViT-L/14 image tower at 224 px {per['clip_image'] / 1e9:.0f} "
              f"GFLOP. A cell of {cost['training_steps']} training steps of batch {cost['batch_size']} (backward "
              f"taken as twice the forward; the VAE encodes each image once, without gradients) and "
              f"{cost['images']} images of {cost['sampling_steps']} sampling steps with guidance:", "",
              "| part | TFLOP | share of the cell |", "|---|---|---|",
              f"| training | {shares['training'] / 1e12:.0f} | {100 * shares['training'] / total:.1f} % |",
              f"| drawing the eval images | {shares['drawing'] / 1e12:.1f} | {100 * shares['drawing'] / total:.1f} % |",
              f"| CLIP-T and CLIP-I (ViT-L/14) | {shares['metrics'] / 1e12:.2f} | "
              f"{100 * shares['metrics'] / total:.2f} % (added) |", "",
              "On a GPU all three are dense matrix work at similar efficiency, so time follows flops: the "
              f"metrics add about {100 * shares['metrics'] / total:.2f} % to a cell, "
              f"{100 * shares['metrics'] / shares['drawing']:.1f} % of drawing its images; at an assumed "
              "sustained 100 TFLOP/s (bf16, an A100/H100-class card) that is "
              f"{shares['metrics'] / 100e12:.2f} s per cell against {total / 100e12:.1f} s for the cell."]
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from balora_diffusion.bench.outputs import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, (clip_metric, world_metric) in zip(axes, PAIRS):
        cells = [c for c in result["cells"] if c[clip_metric] is not None and c[world_metric] is not None]
        ax.scatter([c[world_metric] for c in cells], [c[clip_metric] for c in cells], s=18)
        for c in cells:
            ax.annotate(c["cell"], (c[world_metric], c[clip_metric]), fontsize=6, alpha=0.7)
        row = result["analysis"][f"{clip_metric} vs {world_metric}"]
        ax.set_xlabel(world_metric)
        ax.set_ylabel(f"{clip_metric} (world CLIP)" if Path(result["clip"]).name == "world-clip" else clip_metric)
        ax.set_title(f"rho {_fmt(row['rho'], '+.2f')} over {row['cells']} cells", fontsize=9)
    fig.tight_layout()
    saved = save_figure(path, fig)
    plt.close(fig)
    return saved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.outputs import add_overwrite_flag

    parser.add_argument("--sweep", type=Path, required=True,
                        help="a sweep's output folder (or any folder of run folders) of a world concept, whose "
                             "concept folder has a concept.toml")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: agreement.json, agreement.md, agreement.png")
    parser.add_argument("--page", type=Path, default=None,
                        help="also write the results page here (e.g. docs/results/metrics.md), its figure beside it")
    parser.add_argument("--clip", default="",
                        help="CLIP model (a folder or a hub id in the local cache); empty = the shipped world CLIP")
    parser.add_argument("--sweep-command", default="",
                        help="the command that made the sweep, quoted on the page (default: read from the sweep's "
                             "summary.json where it records one)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test size: seed {QUICK['seeds'][0]}, {QUICK['steps']} sampling steps per image")
    add_overwrite_flag(parser, "an earlier run's agreement.json, agreement.md and agreement.png in --out, and --page")
    parser.epilog = ("Example: balora bench agreement --sweep runs/sweep --out runs/agreement "
                     "--page docs/results/metrics.md")


def _sweep_command(sweep: Path) -> str:
    summary = sweep / SUMMARY
    try:
        data = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    except (OSError, ValueError):
        return ""
    return data.get("command", "") if isinstance(data, dict) else ""


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from balora_diffusion.atomic import atomic_path, write_json_atomic
    from balora_diffusion.bench.outputs import claim_out, write_page
    from balora_diffusion.errors import UserError
    from balora_diffusion.outputs import claim

    if not args.sweep.is_dir():
        raise UserError(f"sweep folder not found: {args.sweep}")
    names = ("agreement.json", "agreement.md", "agreement.png")
    claim_out(args, names)
    if args.page is not None:
        claim([args.page, args.page.with_suffix(".png")], args.overwrite, flag="--page")
    command = ("balora bench agreement" + (" --quick" if args.quick else "")
               + f" --sweep {shlex.quote(str(args.sweep))} --out {shlex.quote(str(args.out))}"
               + (f" --clip {shlex.quote(args.clip)}" if args.clip else "")
               + (f" --page {shlex.quote(str(args.page))}" if args.page else ""))
    draw = QUICK if args.quick else FULL
    result = measure(args.sweep, draw, args.clip)
    first = result["cells"][0]  # evaluate refuses a folder without runs
    result.update(command=command, sweep_command=args.sweep_command or _sweep_command(args.sweep) or "(not recorded)",
                  hardware=f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
                  sd15=sd15_cost(images=first["images"], sampling_steps=draw["steps"], guidance=draw["guidance"] > 1,
                                 training_steps=first["training_steps"] or 0, batch_size=first["batch_size"] or 1))
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(args.out / "agreement.png", result)
    write_json_atomic(args.out / "agreement.json", result)
    with atomic_path(args.out / "agreement.md") as tmp:
        tmp.write_text(page(result, figure.name), encoding="utf-8")
    if args.page is not None:
        write_page(args.page, figure, lambda name: page(result, name))
    for name, row in result["analysis"].items():
        print(f"{name}{' (cross-check)' if row['cross'] else ''}: {verdict(row)}; lower half {_fmt(row['rho_lower_half'], '+.2f')}, upper half "
              f"{_fmt(row['rho_upper_half'], '+.2f')}, {row['at_ceiling']} of {row['cells']} cells at the ceiling")
    t = timing(result)
    print(f"per cell: training {_fmt(t['training'], '.1f')} s, drawing {_fmt(t['draw'])} s, CLIP-T {_fmt(t['clip-t'], '.3f')} s, "
          f"CLIP-I {_fmt(t['clip-i'], '.3f')} s, fidelity {_fmt(t['fidelity'], '.3f')} s, "
          f"adherence {_fmt(t['adherence'], '.3f')} s")
    print(f"wrote {args.out / 'agreement.md'}" + (f" and {args.page}" if args.page else ""))
    return 0
