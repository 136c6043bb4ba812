"""`balora bench loop`: the training step of every method side by side, and where its time goes.

One training configuration (the shipped <zorb> concept, peft LoRA on the UNet attention and the
text encoder, AdamW) is built once; every method gets its own optimizer over the same LoRA
parameters and its own copy of their values, swapped in before its turn. Methods take turns in
rounds with a rotating order, so a drift of the machine hits them alike. Each turn runs some
plain steps, timed as a whole (steps/s), then one step with a device synchronisation after each
phase (the breakdown: data, VAE encode, text encoder, UNet forward, backward, optimizer, rule).
The step is the training loop's own (train.step_loss and train.update), latents cached as `balora train` does.
"""
from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from balora_diffusion.atomic import write_json_atomic
from balora_diffusion.config import parse_bool
from balora_diffusion.bench.outputs import claim_out
from balora_diffusion.bench.plans import add_plan_arguments, timing_plan
from balora_diffusion.devices import pick_device
from balora_diffusion.errors import UserError
from balora_diffusion.outputs import add_overwrite_flag
from balora_diffusion.paths import DEMO_CONCEPT, TINY_SD
from balora_diffusion.rules.registry import NAMED_METHODS
from balora_diffusion.train_config import MAX_SIDE

PHASES = ("data", "vae_encode", "text_encoder", "unet_forward", "backward", "optimizer", "rule")
DEFAULT_METHODS = list(NAMED_METHODS)
PLANS = {
    "cuda": {"warmup": 5, "rounds": 5, "steps_per_round": 4},
    "cpu": {"warmup": 3, "rounds": 5, "steps_per_round": 4},
    "quick": {"warmup": 1, "rounds": 1, "steps_per_round": 1},
}


def native_resolution(model: Path) -> int:
    """The resolution a diffusers folder was trained at: UNet sample size times the VAE's downsampling."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(model / "unet")
    vae = AutoencoderKL.load_config(model / "vae")
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def concept_at(resolution: int, folder: Path) -> Path:
    """The shipped concept in `folder`, its images upscaled where they are below `resolution`
    (the trainer refuses images far below it)."""
    for src in sorted(DEMO_CONCEPT.iterdir()):
        if src.suffix == ".png":
            with Image.open(src) as im:
                scale = max(1.0, resolution / min(im.size))
                im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC).save(folder / src.name)
        elif src.suffix == ".txt":
            shutil.copy(src, folder / src.name)
    return folder


class PhaseTimer:
    """mark(phase) adds the time since the previous mark to `phase`, after waiting for the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)
        self.last = 0.0

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.last = self.sync()

    def __call__(self, phase: str) -> None:
        now = self.sync()
        self.ms[phase] += (now - self.last) * 1e3
        self.last = now


class PeakMemory:
    """The peak memory of a stretch of work: CUDA allocations on a GPU; on the CPU the process's
    resident set (its high-water mark reset through /proc where Linux allows, else the process's)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # the process-wide peak below is then an upper bound

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return process_peak_rss_mib()


def process_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Contender:
    """One method: its optimizer, its accelerator (its own gradient scaler), its parameter values."""
    method: str
    accelerator: object
    optimizer: object
    values: list[torch.Tensor]
    step: int = 0
    plain_seconds: float = 0.0
    plain_steps: int = 0
    marked_steps: int = 0
    phase_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    peak_mib: float = 0.0


def _move_state(optimizer, device: torch.device) -> None:
    """Park an idle method's optimizer state off the GPU, so that each method's peak is its own."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                state[key] = value.to(device)


class LoopBench:
    def __init__(self, args: argparse.Namespace, device: torch.device, workdir: Path):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from balora_diffusion.data import read_concept_folder
        from balora_diffusion.train import latent_batches, load_models
        from balora_diffusion.train_config import TrainConfig

        model = Path(args.base_model) if args.base_model else TINY_SD
        resolution = args.resolution or native_resolution(model)
        precision = args.mixed_precision if device.type == "cuda" else "no"
        self.cfg = TrainConfig(
            data_dir=str(concept_at(resolution, workdir)), token=["<zorb>"], init_word="heart",
            caption_template="a {token}", flip=False, cache_latents=args.cache_latents,
            base_model=str(args.base_model or ""), resolution=resolution, rank=args.rank, alpha=args.rank,
            text_rank=args.rank, text_alpha=args.rank, mixed_precision=precision, method="lora",
            lr_unet=1e-4, lr_text=1e-4, lr_embedding=0.0, weight_decay=0.01, max_grad_norm=1.0,
            batch_size=args.batch_size, cpu_threads=args.threads, output_dir=str(workdir / "run"))
        self.accelerator_args = {"mixed_precision": precision, "cpu": device.type != "cuda"}
        self.accelerator = Accelerator(**self.accelerator_args)
        self.device = self.accelerator.device
        examples = read_concept_folder(self.cfg.data_dir, self.cfg.token, self.cfg.caption_template)
        pipe, data, text, self.pairs = load_models(self.cfg, self.accelerator, examples)
        self.vae = pipe.vae
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.unet, *encoders = self.accelerator.prepare(pipe.unet, *text.models)
        self.text = replace(text, models=encoders)
        self.batches = latent_batches(self.cfg, data, self.vae, self.device, quiet=True)
        self.unet.train()
        for encoder in encoders:
            encoder.train()
        self.params: list[torch.Tensor] = []
        self.contenders = [self._contender(m) for m in args.methods]
        self.timer, self.memory = PhaseTimer(self.device), PeakMemory(self.device)

    def _contender(self, method: str) -> Contender:
        from dataclasses import replace

        from accelerate import Accelerator

        from balora_diffusion.train import make_optimizer

        cfg = replace(self.cfg, method=method)
        optimizer = make_optimizer(cfg, self.unet, self.text, self.pairs)
        if not self.params:
            self.params = [p for g in optimizer.param_groups for p in g["params"]]
        accelerator = Accelerator(**self.accelerator_args)
        return Contender(method, accelerator, accelerator.prepare(optimizer),
                         [p.detach().clone() for p in self.params])

    def _one_step(self, c: Contender, mark) -> None:
        from balora_diffusion.train import step_loss, update

        loss = step_loss(self.cfg, c.step, self.accelerator, self.batches, self.vae, self.text, self.unet,
                         self.scheduler, mark)
        update(self.cfg, c.accelerator, c.optimizer, loss, mark)
        c.step += 1

    def turn(self, c: Contender, plain: int, marked: bool) -> None:
        """`plain` steps timed as a whole, then one step timed phase by phase if `marked`."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, c.values)
        _move_state(c.optimizer, self.device)
        self.memory.reset()
        if plain:
            started = self.timer.sync()
            for _ in range(plain):
                self._one_step(c, _ignore)
            c.plain_seconds += self.timer.sync() - started
            c.plain_steps += plain
        if marked:
            rules = c.optimizer.optimizer  # accelerate's wrapper holds the RuleOptimizer
            self.timer.ms = c.phase_ms
            rules.phase_ends = self.timer
            self.timer.start()
            self._one_step(c, self.timer)
            rules.phase_ends = _ignore
            c.marked_steps += 1
        c.peak_mib = max(c.peak_mib, self.memory.read_mib())
        with torch.no_grad():
            torch._foreach_copy_(c.values, self.params)
        _move_state(c.optimizer, torch.device("cpu"))

    def run(self, warmup: int, rounds: int, steps_per_round: int) -> None:
        n = len(self.contenders)
        with tqdm(total=n * (rounds + 1), unit="turn", desc="bench loop") as bar:
            for c in self.contenders:
                self.turn(c, warmup, marked=False)
                c.plain_seconds, c.plain_steps = 0.0, 0
                bar.update()
            for r in range(rounds):
                for c in self.contenders[r % n:] + self.contenders[: r % n]:
                    self.turn(c, steps_per_round, marked=True)
                    bar.update()

    def report(self) -> dict:
        base = self.contenders[0]
        base_rate = base.plain_steps / base.plain_seconds
        methods = {}
        for c in self.contenders:
            rate = c.plain_steps / c.plain_seconds
            breakdown = {p: c.phase_ms.get(p, 0.0) / c.marked_steps for p in PHASES}
            total = sum(breakdown.values())
            methods[c.method] = {
                "steps_per_second": rate, "ratio_to_lora": rate / base_rate, "peak_memory_mib": c.peak_mib,
                "breakdown_ms": {**breakdown, "total": total}, "rule_share": breakdown["rule"] / total,
                "timed_steps": c.plain_steps, "profiled_steps": c.marked_steps}
        return methods


def _ignore(phase: str) -> None:
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU when usable, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--base-model", default="",
                        help="diffusers folder (e.g. one written by training/make_random_sd15.py); "
                             "default: the shipped tiny model")
    parser.add_argument("--resolution", type=int, default=0,
                        help=f"training resolution, at most {MAX_SIDE}; 0 = the model's native one")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                        help=f"update rules to compare (default: {' '.join(DEFAULT_METHODS)}); lora is always "
                             "run first, as the baseline of the ratios")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (and alpha) of the UNet and the text encoder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                        help="dtype of the frozen base on CUDA (ignored on the CPU), as in balora train")
    parser.add_argument("--cache-latents", type=parse_bool, default=True, metavar="BOOL",
                        help="encode the images once, as balora train does by default (default true)")
    parser.add_argument("--quick", action="store_true", help="smoke-test size: 1 warm-up step, 1 round of 1 step")
    add_plan_arguments(parser, PLANS, {"warmup": "untimed warm-up steps per method", "rounds": "rounds over all methods",
                                          "steps_per_round": "plain timed steps per method and round (plus one profiled step)"})
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write loop.json into (optional)")
    add_overwrite_flag(parser, "an earlier loop.json in --out")


def _check(args: argparse.Namespace, device: torch.device) -> dict[str, int]:
    from balora_diffusion.rules.registry import parse_method

    for method in args.methods:
        parse_method(method)
    args.methods = list(dict.fromkeys(["lora", *args.methods]))
    if args.rank < 1 or args.batch_size < 1 or args.threads < 1 or not 0 <= args.resolution <= MAX_SIDE:
        raise UserError(f"--rank, --batch-size and --threads must be >= 1 and --resolution 0 to {MAX_SIDE}")
    if args.base_model and not (Path(args.base_model) / "unet").is_dir():
        raise UserError(f"--base-model {args.base_model}: not a diffusers folder (no unet/ in it)")
    claim_out(args, ("loop.json",))
    return timing_plan(PLANS, args, device)


def format_table(methods: dict) -> str:
    head = f"{'method':<16}{'steps/s':>9}{'x lora':>8}{'rule ms':>9}{'rule %':>8}{'peak MiB':>10}  " + \
           " ".join(f"{p[:8]:>8}" for p in PHASES[:-1])
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        b = m["breakdown_ms"]
        lines.append(f"{name:<16}{m['steps_per_second']:>9.3f}{m['ratio_to_lora']:>8.3f}{b['rule']:>9.2f}"
                     f"{100 * m['rule_share']:>7.2f}%{m['peak_memory_mib']:>10.0f}  " +
                     " ".join(f"{b[p]:>8.2f}" for p in PHASES[:-1]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    plan = _check(args, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="balora-bench-loop-") as tmp:
            bench = LoopBench(args, device, Path(tmp))
            bench.run(**plan)
            methods = bench.report()
    finally:
        torch.set_num_threads(threads)
    cfg = bench.cfg
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {args.threads} thread(s))",
        "torch": torch.__version__,
        "config": {"base_model": cfg.base_model or "shipped tiny model", "resolution": cfg.resolution,
                   "rank": cfg.rank, "batch_size": cfg.batch_size, "mixed_precision": cfg.mixed_precision,
                   "cache_latents": cfg.cache_latents, "lora_pairs": len(bench.pairs),
                   "unet_targets": cfg.unet_targets, "text_targets": cfg.text_targets},
        "peak_memory_kind": bench.memory.kind,
        "process_peak_rss_mib": process_peak_rss_mib(),
        **plan,
        "methods": methods,
    }
    print(format_table(methods))
    print(f"{report['device']}; {cfg.resolution} px, rank {cfg.rank}, batch {cfg.batch_size}, "
          f"precision {cfg.mixed_precision}, {len(bench.pairs)} LoRA pairs; steps/s over "
          f"{plan['rounds'] * plan['steps_per_round']} steps per method after {plan['warmup']} warm-up; "
          f"breakdown (ms) of {plan['rounds']} profiled step(s); peak memory: {bench.memory.kind}")
    if args.out is not None:
        print(f"wrote {write_json_atomic(Path(args.out) / 'loop.json', report)}")
    return 0
