"""`balora bench peer`: our trainer against diffusers' DreamBooth-LoRA script, same settings, side by side.

The peer is diffusers' `examples/dreambooth/train_dreambooth_lora.py`, the trainer users would pick
instead; it is not shipped with diffusers' package, so the user gives its path (a copy from the
diffusers release installed here; a copy from diffusers' main branch needs its `check_min_version`
line removed). It imports torchvision, which this toolkit does not need.

Both train the shipped concept (each image twice, so that a batch of 4 divides the set) with the
same settings: UNet LoRA on the attention projections and text-encoder LoRA on q/k/v/out, rank r
and alpha r, AdamW lr 1e-4 weight decay 0.01, clipping 1.0, a constant schedule, seed 0, no
validation or checkpoint during the run. Ours also adds its token, frozen (`--lr-embedding 0`).
Runs alternate ours / peer, so a drift of the machine hits both alike, after one untimed warm-up
run of each. Every run is measured from the inside by the same probe (bench/step_probe.py): the
steps' rate, the peak CUDA memory of the steps, the peak RSS.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from balora_diffusion.config import parse_bool
from balora_diffusion.errors import UserError

PRECISIONS = ("no", "fp16", "bf16")
TOKEN = "<zorb>"
PLANS = {"full": {"steps": 200, "runs": 3}, "quick": {"steps": 3, "runs": 1}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from balora_diffusion.outputs import add_overwrite_flag

    parser.add_argument("--peer-script", type=Path, required=True,
                        help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--device", default="cpu",
                        help="cpu (no GPU visible to either trainer) or cuda (default cpu)")
    parser.add_argument("--base-model", type=Path, default=None,
                        help="diffusers folder (e.g. training/make_random_sd15.py's); default the shipped tiny model")
    parser.add_argument("--resolution", type=int, default=0, help="training resolution; 0 = the model's native one")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4], help="LoRA ranks to compare (default 4)")
    parser.add_argument("--precisions", nargs="+", default=["no"], choices=PRECISIONS,
                        help="mixed precision of the frozen base, CUDA only (default no)")
    parser.add_argument("--gradient-checkpointing", nargs="+", type=parse_bool, default=[False], metavar="BOOL",
                        help="with and / or without gradient checkpointing (default false)")
    parser.add_argument("--method", default="lora", help="our update rule (default lora; the peer trains plain LoRA)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {PLANS['full']['steps']})")
    parser.add_argument("--runs", type=int, default=None, help=f"timed runs of each (default {PLANS['full']['runs']})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both trainers (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke-test size: 3 steps, one run of each, no warm-up")
    parser.add_argument("--out", type=Path, default=None, help="folder to write peer.json into (optional)")
    add_overwrite_flag(parser, "an earlier peer.json in --out")


def settings(args: argparse.Namespace) -> list[dict]:
    """Every combination asked for, each one setting of both trainers."""
    return [{"rank": r, "precision": p, "gradient_checkpointing": g}
            for r, p, g in itertools.product(args.ranks, args.precisions, args.gradient_checkpointing)]


def _check(args: argparse.Namespace) -> dict:
    from balora_diffusion.rules.registry import parse_method
    from balora_diffusion.train_config import MAX_SIDE

    plan = dict(PLANS["quick" if args.quick else "full"])
    plan.update({k: getattr(args, k) for k in plan if getattr(args, k) is not None})
    if plan["steps"] < 2 or plan["runs"] < 1:
        raise UserError(f"--steps must be >= 2 (a rate needs two steps) and --runs >= 1, got {plan}")
    if not args.peer_script.is_file():
        raise UserError(f"--peer-script {args.peer_script}: no such file")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: use cpu or cuda")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA GPU is usable here")
    if args.device == "cpu" and args.precisions != ["no"]:
        raise UserError("--precisions fp16 / bf16 need --device cuda (the CPU trains in fp32)")
    if min(args.ranks) < 1 or args.batch_size < 1 or args.threads < 1 or not 0 <= args.resolution <= MAX_SIDE:
        raise UserError(f"--ranks, --batch-size and --threads must be >= 1 and --resolution 0 to {MAX_SIDE}")
    if args.base_model is not None and not (args.base_model / "unet").is_dir():
        raise UserError(f"--base-model {args.base_model}: not a diffusers folder (no unet/ in it)")
    parse_method(args.method)
    return plan


def concept_data(resolution: int, folder: Path) -> Path:
    """The shipped concept's images, each twice, at `resolution` or above; no captions (the peer
    gives every image its one instance prompt, and so does our caption template)."""
    from balora_diffusion.bench.loop import concept_at

    (folder / "staged").mkdir()
    staged = concept_at(resolution, folder / "staged")
    data = folder / "data"
    data.mkdir()
    for image in sorted(staged.glob("*.png")):
        for copy in "ab":
            shutil.copy(image, data / f"{image.stem}{copy}.png")
    return data


def peer_command(args, setting: dict, model: Path, data: Path, resolution: int, steps: int, out: Path) -> list[str]:
    return [str(args.peer_script), "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", f"a {TOKEN}", "--output_dir", str(out), "--resolution", str(resolution),
            "--center_crop", "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--rank", str(setting["rank"]), "--train_text_encoder", "--seed", "0",
            "--mixed_precision", setting["precision"], "--checkpointing_steps", "1000000",
            "--dataloader_num_workers", "0", "--adam_weight_decay", "0.01", "--max_grad_norm", "1.0",
            *(["--gradient_checkpointing"] if setting["gradient_checkpointing"] else [])]


def our_command(args, setting: dict, model: Path, data: Path, resolution: int, steps: int, out: Path) -> list[str]:
    rank = str(setting["rank"])
    return ["-m", "balora_diffusion.cli", "train", "--base-model", str(model), "--data-dir", str(data),
            "--token", TOKEN, "--init-word", "heart", "--caption-template", "a {token}", "--flip", "false",
            "--resolution", str(resolution), "--method", args.method,
            "--unet-targets", "to_q", "to_k", "to_v", "to_out.0", "--rank", rank, "--alpha", rank,
            "--train-text-encoder", "true", "--text-rank", rank, "--text-alpha", rank,
            "--text-targets", "q_proj", "k_proj", "v_proj", "out_proj",
            "--lr-unet", "1e-4", "--lr-text", "1e-4", "--lr-embedding", "0", "--weight-decay", "0.01",
            "--max-grad-norm", "1.0", "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--lr-scheduler", "constant", "--warmup-steps", "0", "--seed", "0", "--cpu-threads", str(args.threads),
            "--mixed-precision", setting["precision"],
            "--gradient-checkpointing", str(setting["gradient_checkpointing"]).lower(),
            "--output-dir", str(out), "--checkpoint-every", "1000000", "--eval-every", "1000000",
            "--grid-every", "0", "--heldout-size", "1", "--grid-seeds", "1", "--fusion", "1.0", "--sample-steps", "1"]


def probed_run(trainer_args: list[str], work: Path, name: str, args: argparse.Namespace) -> dict:
    """One trainer run under the step probe; its report, or a UserError quoting its log's last line."""
    report, log = work / f"{name}.json", work / f"{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.device == "cpu":  # both trainers take a GPU whenever they see one
        env["CUDA_VISIBLE_DEVICES"] = ""
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "balora_diffusion.bench.step_probe", str(report),
                                *trainer_args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env)
    if code != 0 or not report.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{name} failed with exit {code}: {tail[0]}")
    return json.loads(report.read_text())


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def compare(ours: list[dict], peer: list[dict]) -> dict:
    """Medians of each trainer's runs and of the pair-by-pair ratios ours / peer."""
    row = {}
    for key in ("steps_per_second", "peak_cuda_mib", "peak_rss_mib"):
        row[key] = {"ours": _median([r[key] for r in ours]), "peer": _median([r[key] for r in peer]),
                    "ratio": _median([a[key] / b[key] for a, b in zip(ours, peer) if a[key] and b[key]])}
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'rank':>4} {'precision':>9} {'ckpt':>5}  {'steps/s ours':>12} {'peer':>7} {'ratio':>6}  "
            f"{'CUDA MiB ours':>13} {'peer':>7} {'ratio':>6}  {'RSS ratio':>9}")

    def num(value, fmt):
        return format(value, fmt) if value is not None else "-".rjust(int(fmt.split(".")[0]))

    lines = [head, "-" * len(head)]
    for r in rows:
        s, m = r["steps_per_second"], r["peak_cuda_mib"]
        lines.append(f"{r['rank']:>4} {r['precision']:>9} {str(r['gradient_checkpointing']).lower():>5}  "
                     f"{num(s['ours'], '12.3f')} {num(s['peer'], '7.3f')} {num(s['ratio'], '6.3f')}  "
                     f"{num(m['ours'], '13.0f')} {num(m['peer'], '7.0f')} {num(m['ratio'], '6.3f')}  "
                     f"{num(r['peak_rss_mib']['ratio'], '9.3f')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from balora_diffusion.bench.loop import native_resolution
    from balora_diffusion.bench.outputs import claim_out
    from balora_diffusion.paths import TINY_SD

    plan = _check(args)
    claim_out(args, ("peer.json",))
    model = (args.base_model or TINY_SD).resolve()
    resolution = args.resolution or native_resolution(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="balora-bench-peer-") as tmp:
        work = Path(tmp)
        data = concept_data(resolution, work)
        for setting in settings(args):
            label = f"rank {setting['rank']}, {setting['precision']}, checkpointing {setting['gradient_checkpointing']}"
            commands = {
                "ours": lambda steps, out, s=setting: our_command(args, s, model, data, resolution, steps, out),
                "peer": lambda steps, out, s=setting: peer_command(args, s, model, data, resolution, steps, out)}
            if not args.quick:  # file cache and one-time compilation, not counted
                for who, command in commands.items():
                    probed_run(command(2, work / f"warm-{who}"), work, f"warm-up {who}", args)
            runs: dict[str, list[dict]] = {"ours": [], "peer": []}
            for i in range(plan["runs"]):
                for who, command in commands.items():
                    report = probed_run(command(plan["steps"], work / f"{who}-{i}"), work, f"{who} run {i + 1}", args)
                    runs[who].append(report)
                    print(f"{label}: {who} run {i + 1}: {report['steps_per_second'] or 0:.3f} steps/s", flush=True)
            rows.append({**setting, **compare(runs["ours"], runs["peer"]), "runs": runs})
    print(format_table(rows))
    print(f"{args.device}, {resolution} px, batch {args.batch_size}, ours: {args.method}; {plan['steps']} steps, "
          f"{plan['runs']} run(s) of each, medians; ratio = ours / peer, pair by pair")
    if args.out is not None:
        from balora_diffusion.atomic import write_json_atomic

        target = write_json_atomic(args.out / "peer.json", {
            "device": args.device, "resolution": resolution, "batch_size": args.batch_size, "method": args.method,
            "base_model": str(model), "threads": args.threads, **plan, "settings": rows})
        print(f"wrote {target}")
    return 0
