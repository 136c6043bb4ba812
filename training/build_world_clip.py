"""Build the world's own CLIP (assets/world-clip): a tiny transformers CLIPModel trained contrastively on
the procedural world's renders and captions, so that `balora eval` scores CLIP-T and CLIP-I offline.

The vision tower is a small ViT on 64 px images, the text tower a small transformer over the shipped
CLIP BPE tokenizer (assets/tokenizer, the full 49,408-token vocabulary). Training images are jittered
renders of the world's training split (balora_diffusion.world; its held-out colour pairs stay out) and
of the shipped concepts' shapes under their class words: the <zorb>'s pink and cyan heart as "heart"
and the <quax>'s lime and brown ring as "ring" (training/make_demo_concept.py draws both), on every
background, size and position, so that "a large heart on a blue background" means something.

Captions leave out some attributes at random, and a caption counts as matching every image it
describes (not only its own), so "a heart on a blue background" is trained to agree with hearts of
any size and position. The loss is CLIP's symmetric cross-entropy with those soft targets.

Seeded; a checkpoint is written atomically every N steps into <out>-state, and `--resume` continues
an interrupted build from it. At the end the recipe measures retrieval on renders it never trained
on and writes the model (fp16 safetensors, CLIPProcessor at 64 px) with a model card giving them.

    nice -n 10 python training/build_world_clip.py --out assets/world-clip
    python training/build_world_clip.py --quick --out /tmp/world-clip     # seconds, for tests
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
TRAINING = REPO / "training"
for folder in (REPO, TRAINING):  # run as a script or loaded by path from the tests
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import make_demo_concept as concepts  # noqa: E402
from build_tiny_model import count_params, lr_factor, newest_state, set_lr, start  # noqa: E402

from balora_diffusion import paths, world  # noqa: E402
from balora_diffusion.atomic import atomic_path  # noqa: E402
from balora_diffusion.cli import drop_known_notices  # noqa: E402
from balora_diffusion.checkpoint import checkpoint_step, load_tree, write_checkpoint  # noqa: E402
from balora_diffusion.config import add_config_arguments, config_from_args, field  # noqa: E402
from balora_diffusion.errors import UserError  # noqa: E402
from balora_diffusion.threads import HELP as THREADS_HELP  # noqa: E402
from balora_diffusion.threads import use_cpu_threads  # noqa: E402

EXIT_STOPPED = 3  # stopped at --time-limit with a checkpoint; rerun with --resume
RUN_ONLY = {"time_limit", "out", "checkpoint_every", "cpu_threads"}  # may change between an interrupted build and its resumption
# Overrides of --quick: a model in seconds whose files are laid out exactly as the real one's.
QUICK = dict(world_pool=256, concept_pool=8, steps=6, batch_size=32, warmup_steps=2, checkpoint_every=3,
             heldout_world=24, heldout_concept=4, vision_layers=1, text_layers=1)

# The concepts' shapes as the world's extra shapes, under their class words; their colours are
# implied by the shape (a heart here is always the <zorb>'s pink and cyan), so a caption never names them.
CONCEPT_SHAPES = {"heart": concepts.render_zorb, "ring": concepts.render_quax}
SHAPES = (*world.SHAPES, *CONCEPT_SHAPES)
COLOURS = (*world.COLOURS, *(f"{word} colours" for word in CONCEPT_SHAPES))
BACKGROUNDS, SIZES, POSITIONS = tuple(world.BACKGROUNDS), world.SIZES, world.POSITIONS
ATTRIBUTES = ("shape", "colour", "background", "size", "position")
VALUES = dict(zip(ATTRIBUTES, (SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS)))


@dataclass
class BuildConfig:
    out: str = field("assets/world-clip", "folder the finished model is written to (checkpoints go to the sibling "
                     "folder <out>-state, removed when the build completes)")
    seed: int = field(0, "seed of the renders, the initialisation, batches and caption omissions")
    world_pool: int = field(6000, "jittered renders of the world's training split drawn once and sampled from")
    concept_pool: int = field(200, "jittered renders of each concept shape (heart, ring) drawn once")
    concept_share: float = field(0.2, "share of each batch drawn from the concept shapes")
    omit: float = field(0.25, "chance that each of size, colour, position and background is left out of a caption")
    # --- vision tower (a ViT on 64 px renders)
    vision_hidden: int = field(48, "vision transformer width")
    vision_layers: int = field(3, "vision transformer layers")
    vision_heads: int = field(4, "vision attention heads")
    patch_size: int = field(8, "ViT patch side in pixels (64 px / 8 = 64 patches)")
    # --- text tower
    text_hidden: int = field(32, "text transformer width; the 49,408-token embedding costs 49,408 x this")
    text_layers: int = field(2, "text transformer layers")
    text_heads: int = field(2, "text attention heads")
    projection_dim: int = field(64, "width of the shared image-text embedding")
    # --- optimisation
    steps: int = field(800, "optimizer steps")
    batch_size: int = field(128, "image-caption pairs per step")
    lr: float = field(2e-3, "peak learning rate (AdamW, warm-up then cosine decay)")
    warmup_steps: int = field(50, "linear learning-rate warm-up steps")
    max_grad_norm: float = field(1.0, "gradient clipping norm")
    # --- held-out measurement
    heldout_world: int = field(300, "fresh renders of the world's training scenes (new jitter) and as many of its "
                               "held-out colour pairs, scored at the end")
    heldout_concept: int = field(50, "fresh renders of each concept shape scored at the end")
    # --- run
    checkpoint_every: int = field(100, "write a resumable checkpoint every N steps")
    cpu_threads: int = field(0, THREADS_HELP, ge=0)
    time_limit: float = field(0.0, "minutes after which to checkpoint and stop (exit code 3); 0 = no limit")


# --- scenes, captions, renders ----------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """A scene of the world or a concept shape; colour is the world colour or "<word> colours"."""
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def caption(self, omit: frozenset[str] = frozenset()) -> str:
        concept = self.shape in CONCEPT_SHAPES
        # world.Scene words the caption; a concept shape stands in for a placeholder red circle
        scene = world.Scene("circle" if concept else self.shape, "red" if concept else self.colour, self.background,
                            self.size, self.position)
        text = scene.caption(omit | {"colour"} if concept else omit)
        return text.replace("circle", self.shape) if concept else text

    def codes(self) -> list[int]:
        return [VALUES[a].index(getattr(self, a)) for a in ATTRIBUTES]

    def render(self, jitter_seed: int) -> np.ndarray:
        if self.shape in CONCEPT_SHAPES:
            image = CONCEPT_SHAPES[self.shape](self.background, self.size, self.position, 64, jitter_seed)
        else:
            image = world.render(world.Scene(self.shape, self.colour, self.background, self.size, self.position), 64,
                                 jitter_seed)
        return np.asarray(image, dtype=np.uint8)


def named(item: Item, omit: frozenset[str]) -> list[bool]:
    """Which attributes a caption pins down: a centred position has no words, so it names none."""
    return [a == "shape" or (a not in omit and not (a == "colour" and item.shape in CONCEPT_SHAPES)
                             and not (a == "position" and item.position == "center")) for a in ATTRIBUTES]


def world_items(scenes: list[world.Scene]) -> list[Item]:
    return [Item(s.shape, s.colour, s.background, s.size, s.position) for s in scenes]


def concept_items(word: str) -> list[Item]:
    return [Item(word, f"{word} colours", b, s, p) for b in BACKGROUNDS for s in SIZES for p in POSITIONS]


def draw(items: list[Item], count: int, rng: np.random.Generator, what: str) -> tuple[np.ndarray, list[Item]]:
    """`count` jittered renders of random `items`, as (N, 64, 64, 3) uint8."""
    chosen = [items[i] for i in rng.integers(len(items), size=count)]
    seeds = rng.integers(2**62, size=count)
    images, started = [], time.monotonic()
    for i, (item, seed) in enumerate(zip(chosen, seeds)):
        images.append(item.render(int(seed)))
        if (i + 1) % max(1, count // 4) == 0:
            print(f"  rendered {i + 1}/{count} {what} ({time.monotonic() - started:.0f} s)", flush=True)
    return np.stack(images), chosen


# --- the model --------------------------------------------------------------------------------

def build_model(cfg: BuildConfig):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads, image_size=64,
                           patch_size=cfg.patch_size),
        projection_dim=cfg.projection_dim)
    return CLIPModel(config)


def build_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    return CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64},
                                                           crop_size={"height": 64, "width": 64}),
                         tokenizer=CLIPTokenizer.from_pretrained(paths.TOKENIZER))


def embed(model, processor, images: np.ndarray | None = None, texts: list[str] | None = None) -> torch.Tensor:
    """Unit embeddings through the processor, as balora_diffusion.metrics computes them for eval."""
    if images is not None:
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        return F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


def soft_clip_loss(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of text->image and image->text logits against every match, not only the
    diagonal: two captions alike (or a caption that leaves attributes out) are no negatives of each other."""
    targets = matches.float()
    text_to_image = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    image_to_text = -(targets / targets.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (text_to_image + image_to_text) / 2


# --- held-out measurement ---------------------------------------------------------------------

def alternatives(item: Item, attribute: str) -> list[Item]:
    """`item` with `attribute` changed to each other value that makes a valid, describable scene."""
    out = []
    for value in VALUES[attribute]:
        if value == getattr(item, attribute) or attribute == "colour" and (item.shape in CONCEPT_SHAPES
                                                                           or value not in world.COLOURS):
            continue
        concept = (value if attribute == "shape" else item.shape) in CONCEPT_SHAPES
        if attribute == "shape" and concept != (item.shape in CONCEPT_SHAPES):
            continue  # a world colour on a heart, or a heart's colours on a star, is no scene
        # a concept shape brings its own colours
        other = dataclasses.replace(item, **{attribute: value}, **({"colour": f"{value} colours"}
                                                                   if concept and attribute == "shape" else {}))
        if not concept and other.colour == other.background:
            continue
        out.append(other)
    return out


@torch.no_grad()
def measure(model, processor, groups: dict[str, tuple[np.ndarray, list[Item]]], seed: int) -> dict:
    """Per group of fresh renders: top-1 retrieval of the exact full caption among every scene's
    caption, and per attribute the share of images whose true caption beats one with that attribute
    changed (a random other value)."""
    model.eval()
    candidates = world_items(world.all_scenes()) + [i for w in CONCEPT_SHAPES for i in concept_items(w)]
    texts = [c.caption() for c in candidates]
    text_emb = torch.cat([embed(model, processor, texts=texts[i:i + 512]) for i in range(0, len(texts), 512)])
    rng = np.random.default_rng(seed)
    report = {}
    for name, (images, items) in groups.items():
        image_emb = torch.cat([embed(model, processor, images=images[i:i + 256]) for i in range(0, len(images), 256)])
        best = (image_emb @ text_emb.T).argmax(1)
        row = {"images": len(items), "retrieval": float(np.mean([texts[b] == it.caption() for b, it in zip(best, items)]))}
        for attribute in ATTRIBUTES:
            pairs = [(it, alts[rng.integers(len(alts))]) for it in items if (alts := alternatives(it, attribute))]
            if not pairs:
                continue
            index = [i for i, it in enumerate(items) if alternatives(it, attribute)]
            wrong = embed(model, processor, texts=[b.caption() for _, b in pairs])
            right = embed(model, processor, texts=[a.caption() for a, _ in pairs])
            own = image_emb[index]
            row[attribute] = float(((own * right).sum(1) > (own * wrong).sum(1)).float().mean())
        report[name] = row
    model.train()
    return report


# --- the build --------------------------------------------------------------------------------

def state_dir(cfg: BuildConfig) -> Path:
    out = Path(cfg.out)
    return out.with_name(out.name + "-state")


def comparable(cfg: BuildConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}


class Build:
    def __init__(self, cfg: BuildConfig, command: str):
        for name in ("world_pool", "concept_pool", "steps", "batch_size", "checkpoint_every"):
            if getattr(cfg, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= cfg.concept_share < 1 or not 0 <= cfg.omit < 1:
            raise UserError("--concept-share and --omit must be in [0, 1)")
        self.cfg, self.command = cfg, command
        self.out, self.state = Path(cfg.out), state_dir(cfg)
        self.started = time.monotonic()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg)
        use_cpu_threads(cfg.cpu_threads, [self.model])
        self.processor = build_processor()
        self.opt = torch.optim.AdamW([{"params": list(self.model.parameters()), "lr": cfg.lr, "peak_lr": cfg.lr}],
                                     betas=(0.9, 0.98), weight_decay=0.1)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.meta = {"step": 0, "seconds": 0.0, "loss": [], "config": comparable(cfg)}

    # -- checkpoints
    def save(self) -> None:
        meta = dict(self.meta, rng=self.generator.get_state())
        write_checkpoint(self.state, self.meta["step"], {"meta": meta, "model": self.model.state_dict(),
                                                         "opt": self.opt.state_dict()})

    def restore(self) -> None:
        folder, meta = newest_state(self.state, comparable(self.cfg))
        self.model.load_state_dict(load_tree(folder, "model"))
        self.opt.load_state_dict(load_tree(folder, "opt"))
        self.generator.set_state(meta.pop("rng"))
        self.meta = meta
        print(f"resumed from {folder} (step {checkpoint_step(folder)})", flush=True)

    def out_of_time(self) -> bool:
        return self.cfg.time_limit > 0 and time.monotonic() - self.started > 60 * self.cfg.time_limit

    # -- data
    def render_pools(self) -> None:
        """The same pools on every (re)start: they are a function of the seed alone."""
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, 1))
        started = time.monotonic()
        world_images, world_chosen = draw(world_items(world.train_scenes()), cfg.world_pool, rng, "world scenes")
        parts = [(world_images, world_chosen)]
        for word in CONCEPT_SHAPES:
            parts.append(draw(concept_items(word), cfg.concept_pool, rng, f"{word}s"))
        self.pools = []
        for images, items in parts:
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            self.pools.append((pixels, items, torch.tensor([it.codes() for it in items])))
        print(f"rendered the training pools in {time.monotonic() - started:.0f} s", flush=True)

    def batch(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Pixels, captions (some attributes left out) and the (caption, image) match matrix."""
        cfg, g = self.cfg, self.generator
        n_concept = round(cfg.batch_size * cfg.concept_share)
        counts = [cfg.batch_size - n_concept, n_concept // 2, n_concept - n_concept // 2]
        pixels, items, codes = [], [], []
        for (pool_pixels, pool_items, pool_codes), n in zip(self.pools, counts):
            index = torch.randint(len(pool_items), (n,), generator=g)
            pixels.append(pool_pixels[index])
            items += [pool_items[i] for i in index.tolist()]
            codes.append(pool_codes[index])
        codes = torch.cat(codes)
        droppable = ("size", "colour", "position", "background")
        dropped = torch.rand((len(items), len(droppable)), generator=g) < cfg.omit
        omits = [frozenset(a for a, d in zip(droppable, row) if d) for row in dropped.tolist()]
        mask = torch.tensor([named(it, om) for it, om in zip(items, omits)])
        # caption i matches image j when j shows every attribute caption i names
        agree = codes[:, None, :] == codes[None, :, :]
        matches = (agree | ~mask[:, None, :]).all(-1)
        return torch.cat(pixels), [it.caption(om) for it, om in zip(items, omits)], matches

    def step(self, step: int) -> float:
        cfg = self.cfg
        set_lr(self.opt, lr_factor(step, cfg.steps, cfg.warmup_steps))
        pixels, texts, matches = self.batch()
        tokens = self.processor(text=texts, return_tensors="pt", padding=True)
        image = F.normalize(self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text = F.normalize(self.model.text_projection(out.pooler_output), dim=-1)
        logits = self.model.logit_scale.exp().clamp(max=100) * text @ image.T
        loss = soft_clip_loss(logits, matches)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.opt.step()
        return float(loss.detach())

    def run(self) -> int:
        cfg = self.cfg
        self.render_pools()
        self.model.train()
        running = None
        for step in range(self.meta["step"], cfg.steps):
            tick = time.monotonic()
            loss = self.step(step)
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {step}; the last good checkpoint is in {self.state} "
                                   "(lower --lr and --resume)")
            self.meta["seconds"] += time.monotonic() - tick
            self.meta["step"] = step + 1
            running = loss if running is None else 0.95 * running + 0.05 * loss
            done = step + 1 == cfg.steps
            if step % 25 == 0 or done:
                self.meta["loss"].append([step, round(running, 5)])
                print(f"step {step + 1}/{cfg.steps}  loss {running:.4f}  "
                      f"{self.meta['seconds'] / (step + 1):.3f} s/step", flush=True)
            if (step + 1) % cfg.checkpoint_every == 0 or done or self.out_of_time():
                self.save()
                if not done and self.out_of_time():
                    print(f"stopped at the time limit after step {step + 1}; continue with --resume "
                          f"(checkpoint in {self.state})")
                    return EXIT_STOPPED
        report = self.heldout()
        self.export(report)
        shutil.rmtree(self.state, ignore_errors=True)
        return 0

    def heldout(self) -> dict:
        """Renders from a seed the pools never use: fresh jitter of trained scenes, the world's held-out
        colour pairs (never seen together), and fresh concept shapes."""
        cfg = self.cfg
        rng = np.random.default_rng((cfg.seed, 2))
        groups = {"world scenes, new renders": draw(world_items(world.train_scenes()), cfg.heldout_world, rng,
                                                    "held-out world renders"),
                  "world held-out colour pairs": draw(world_items(world.heldout_scenes()), cfg.heldout_world, rng,
                                                      "held-out colour pairs")}
        for word in CONCEPT_SHAPES:
            groups[f"{word}s"] = draw(concept_items(word), cfg.heldout_concept, rng, f"held-out {word}s")
        report = measure(self.model, self.processor, groups, cfg.seed)
        for name, row in report.items():
            print(f"held out, {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items()), flush=True)
        return report

    def info(self, report: dict) -> dict:
        return {"command": self.command, "config": dataclasses.asdict(self.cfg), "steps_done": self.meta["step"],
                "seconds_training": round(self.meta["seconds"], 1),
                "parameters": {"vision": count_params(self.model.vision_model),
                               "text": count_params(self.model.text_model),
                               "all": count_params(self.model)},
                "heldout": report, "loss_log": self.meta["loss"],
                "hardware": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
                "versions": {"torch": torch.__version__, "python": platform.python_version()}}

    def export(self, report: dict) -> None:
        info = self.info(report)
        with atomic_path(self.out) as tmp:
            model = build_model(self.cfg)
            model.load_state_dict(self.model.state_dict())
            model.half().save_pretrained(tmp)  # fp16 on disk (half the bytes); eval loads it as float32
            self.processor.save_pretrained(tmp)
            # the vendored BPE files (vocab.json + merges.txt), not the 3.6 MB tokenizer.json re-serialisation
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (tmp / name).unlink(missing_ok=True)
            for source in paths.TOKENIZER.iterdir():
                shutil.copy2(source, tmp / source.name)
            (tmp / "build_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
        size = sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file())
        print(f"wrote {self.out} ({size / 2**20:.1f} MiB, {info['parameters']['all']:,} parameters)", flush=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def model_card(info: dict) -> str:
    cfg = info["config"]
    rows = []
    for name, row in info["heldout"].items():
        rows.append(f"| {name} | {row['images']} | {_pct(row['retrieval'])} | "
                    + " | ".join(_pct(row.get(a)) for a in ATTRIBUTES) + " |")
    strong = sorted({a for row in info["heldout"].values() for a in ATTRIBUTES if row.get(a, 0) >= 0.9})
    weak = sorted({f"{a} ({name})" for name, row in info["heldout"].items() for a in ATTRIBUTES
                   if a in row and row[a] < 0.75})
    return f"""# world-clip: the procedural world's own CLIP

A tiny `transformers` CLIPModel (ViT vision tower on 64 px images, {cfg['vision_layers']} layers of width
{cfg['vision_hidden']}, patch {cfg['patch_size']}; text tower of {cfg['text_layers']} layers of width {cfg['text_hidden']}
over the shipped CLIP BPE tokenizer; {info['parameters']['all']:,} parameters, fp16 safetensors) with its
CLIPProcessor (64 px). `balora eval` scores CLIP-T and CLIP-I with it when no `--clip` is given: it
reads the shipped toy world, not photos. For real concepts pass a real CLIP
(`--clip openai/clip-vit-large-patch14`).

## Trained on

Renders of `balora_diffusion.world` (the four shapes in six colours on five backgrounds, two sizes,
five positions; its training split, so the held-out colour pairs never appear) with their captions,
and the shipped concepts' shapes under their class words: the `<zorb>`'s pink and cyan heart as
"heart" and the `<quax>`'s lime and brown ring as "ring" (drawn by `training/make_demo_concept.py`),
on every background, size and position. Each caption leaves out size, colour, position and
background with chance {cfg['omit']:g} each; a caption matches every image it describes.
{cfg['world_pool']} world renders and {cfg['concept_pool']} of each concept shape, {info['steps_done']} steps of
{cfg['batch_size']} pairs, seed {cfg['seed']}, {info['seconds_training']:.0f} s of training on {info['hardware']}.

Built by (training/build_world_clip.py):

    {info['command']}

## Held-out accuracy (measured by the recipe, on renders it never trained on)

Retrieval: the share of images whose exact full caption scores highest among the captions of every
scene of the world and of the concept shapes ({len(world.all_scenes()) + 2 * len(concept_items('heart'))} captions).
Per attribute: the share of images whose true caption scores above the same caption with that
attribute changed to another value, drawn at random (a heart's colours are never named).

| renders | images | retrieval | {' | '.join(ATTRIBUTES)} |
| --- | --- | --- | {' | '.join('---' for _ in ATTRIBUTES)} |
{chr(10).join(rows)}

What it tells apart (90 % or more in some group): {', '.join(strong) or 'none'}.
Where it is weak (under 75 %): {', '.join(weak) or 'nowhere'}.

## What it cannot do

It knows only this world: flat shapes on flat backgrounds at 64 px. It has never seen a photo, a
texture, a word outside the world's captions, or a colour outside the world's palette and the two
concepts' colours; its scores on anything else mean nothing. "heart" means the `<zorb>`'s pink and
cyan heart and "ring" the `<quax>`'s lime and brown ring, whatever colour a prompt gives them. The
colour pairs the world holds out of training are the test of composition above, not knowledge it has.
"""


def parse_args(argv: list[str] | None) -> tuple[BuildConfig, bool, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny pool and a few steps (seconds, for tests); flags given still override it")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted build from the newest checkpoint in <out>-state")
    add_config_arguments(parser, BuildConfig)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key, None) is None:
                setattr(args, key, str(value))
    argv = sys.argv[1:] if argv is None else argv
    command = "python training/build_world_clip.py " + " ".join(shlex.quote(a) for a in argv)
    return config_from_args(BuildConfig, args), args.resume, command.strip()


def main(argv: list[str] | None = None) -> int:
    drop_known_notices()
    try:
        cfg, resume, command = parse_args(argv)
        build = Build(cfg, command)
        start(build, resume)
        return build.run()
    except UserError as exc:
        print(f"build_world_clip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
