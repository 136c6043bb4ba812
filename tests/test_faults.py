"""Fault campaign: bad inputs through the real `balora` command, one subprocess each.

Every case holds the contract for bad input: exit code 2, exactly one `balora: error: ...` line on
stderr (naming the problem) and nothing else there, no traceback anywhere, no adapter or run.json
written, and a finished run that sits beside the case's folder left byte-identical.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from balora_diffusion import paths

# Quick training options: a case that is refused must be refused whatever they are.
TRAIN = ["--token", "<zorb>", "--init-word", "heart", "--steps", "2", "--eval-every", "1", "--checkpoint-every", "1",
         "--sample-steps", "1", "--grid-seeds", "1", "--fusion", "1", "--heldout-size", "2", "--batch-size", "2"]


class Work:
    """A case's folder: a copy of the demo concept, the random model, a finished run, helpers."""

    def __init__(self, root: Path, model: Path, finished: Path):
        self.root, self.model = root, model
        self.concept = root / "concept"
        shutil.copytree(paths.DEMO_CONCEPT, self.concept)
        self.prior = root / "prior"
        shutil.copytree(finished, self.prior)

    def train(self, *args, data=None, model=None, out="out") -> list[str]:
        return ["train", "--data-dir", str(data or self.concept), "--base-model", str(model or self.model),
                "--output-dir", out, *TRAIN, *map(str, args)]

    def generate(self, *args, adapter=None) -> list[str]:
        return ["generate", "--base-model", str(self.model), "--steps", "1", "--seeds", "1", "--out", "new",
                *(["--adapter", str(adapter)] if adapter else []), *map(str, args)]

    def export(self, source, out="new.safetensors") -> list[str]:
        return ["export", str(source), "--format", "kohya", "--out", str(out)]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def images(self, name: str, *, keep: int = 2) -> Path:
        """A concept folder with the first `keep` demo images, to which a case adds its bad one."""
        folder = self.root / name
        folder.mkdir()
        for png in sorted(paths.DEMO_CONCEPT.glob("*.png"))[:keep]:
            shutil.copy(png, folder / png.name)
            shutil.copy(png.with_suffix(".txt"), folder / png.with_suffix(".txt").name)
        return folder

    def model_copy(self, name: str) -> Path:
        folder = self.root / name
        shutil.copytree(self.model, folder)
        return folder


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is a single row of nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _caption(w: Work, text: bytes) -> Path:
    folder = w.images("captioned")
    (folder / "00.txt").write_bytes(text)
    return folder


def _image(w: Work, name: str, write) -> Path:
    folder = w.images("pictures")
    write(folder / name)
    return folder


def _tiny_image(path: Path) -> None:
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    path.with_suffix(".txt").write_text("a <zorb>")


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _masked(w: Work, mask: Image.Image | None) -> Path:
    """Two demo images with the shipped masks, the second mask replaced by `mask` (None: removed)."""
    folder = w.images("masked")
    for image in sorted(folder.glob("*.png")):
        shutil.copy(paths.DEMO_MASKS / f"{image.stem}.mask.png", folder / f"{image.stem}.mask.png")
    second = sorted(folder.glob("*.mask.png"))[1]
    second.unlink()
    if mask is not None:
        mask.save(second)
    return folder


def _model_with(w: Work, change) -> Path:
    folder = w.model_copy("model")
    change(folder)
    return folder


# name -> (case(work) -> argv, a fragment the error line must hold)
CASES = {
    # --- flags
    "steps zero": (lambda w: w.train("--steps", "0"), "steps"),
    "steps negative": (lambda w: w.train("--steps", "-5"), "steps"),
    "steps not a number": (lambda w: w.train("--steps", "ten"), "steps"),
    "negative learning rate": (lambda w: w.train("--lr-unet", "-1"), "lr-unet"),
    "nan clipping norm": (lambda w: w.train("--max-grad-norm", "nan"), "max-grad-norm"),
    "zero sampling steps": (lambda w: w.train("--sample-steps", "0"), "sample-steps"),
    "empty fusion list": (lambda w: w.train("--fusion"), "fusion"),
    "rank zero": (lambda w: w.train("--rank", "0"), "rank"),
    "rank above the layer": (lambda w: w.train("--rank", "64"), "rank"),
    "unknown method": (lambda w: w.train("--method", "bolora"), "bolora"),
    "unknown optimizer": (lambda w: w.train("--optimizer", "lion"), "lion"),
    "unknown precision": (lambda w: w.train("--mixed-precision", "fp8"), "mixed-precision"),
    "beta of one or more": (lambda w: w.train("--adam-beta1", "1.5"), "adam-beta1"),
    "template with another field": (lambda w: w.train("--caption-template", "a {thing}"), "caption"),
    "unknown flag": (lambda w: w.train("--stepz", "3"), "--stepz"),
    "flag without its value": (lambda w: w.train("--seed"), "--seed"),
    "unknown command": (lambda w: ["trian"], "trian"),
    "training resolution past the limit": (lambda w: w.train("--resolution", "100000"), "2048"),
    "generate at a size past the limit": (lambda w: w.generate("--prompt", "a", "--size", "100000"), "2048"),
    "training resolution the model cannot halve": (lambda w: w.train("--resolution", "18"), "multiple of 4"),
    "train from the demo config without a concept": (lambda w: ["train", "--config", "demo", "--output-dir", "out"],
                                                     "--data-dir"),
    "generate into a folder that refuses writes": (lambda w: w.generate("--prompt", "a", "--out", "/proc/new"), "/proc"),
    "generate with the token past the text window": (lambda w: w.generate("--prompt", "word " * 80 + "<zorb>",
                                                                          adapter=w.prior), "<zorb>"),
    # --- TOML configs
    "config missing": (lambda w: w.train("--config", "nope.toml"), "nope.toml"),
    "config not TOML": (lambda w: w.train("--config", w.file("bad.toml", "steps = = 3\n")), "TOML"),
    "config unknown option": (lambda w: w.train("--config", w.file("bad.toml", "stepz = 3\n")), "stepz"),
    "config string for a number": (lambda w: w.train("--config", w.file("bad.toml", 'lr_unet = "2e-3"\n')), "lr_unet"),
    "config zero repeats": (lambda w: w.train("--config", w.file("bad.toml", "repeats = 0\n")), "repeats"),
    "config extends itself": (lambda w: w.train("--config", w.file("loop.toml", 'extends = "loop.toml"\n')), "cycle"),
    "config extends a missing file": (lambda w: w.train("--config", w.file("c.toml", 'extends = "gone.toml"\n')),
                                      "gone.toml"),
    "config in Latin-1": (lambda w: w.train("--config", w.file("l1.toml", '# caf\xe9\nsteps = 3\n'.encode("latin-1"))),
                          "l1.toml"),
    "config is a folder": (lambda w: w.train("--config", w.concept), "config"),
    # --- data
    "data folder missing": (lambda w: w.train(data=w.root / "nowhere"), "nowhere"),
    "data folder empty": (lambda w: w.train(data=w.images("empty", keep=0)), "empty"),
    "data folder is a file": (lambda w: w.train(data=w.file("notes.txt", "hi")), "notes.txt"),
    "image that is not one": (lambda w: w.train(data=_image(w, "zz.png", lambda p: p.write_text("not a png"))), "zz.png"),
    "caption without the token": (lambda w: w.train(data=_caption(w, b"a heart")), "00.txt"),
    "caption in Latin-1": (lambda w: w.train(data=_caption(w, "a <zorb> caf\xe9".encode("latin-1"))), "00.txt"),
    "token past the text window": (lambda w: w.train(data=_caption(w, ("word " * 80 + "<zorb>").encode())), "00.txt"),
    "one-pixel image": (lambda w: w.train(data=_image(w, "zz.png", _tiny_image)), "zz.png"),
    "decompression bomb": (lambda w: w.train(data=_image(w, "zz.png", lambda p: p.write_bytes(_png_claiming(40000, 40000)))),
                           "zz.png"),
    # --- photos: buckets, masks, prior, hold-out
    "masked loss without a mask": (lambda w: w.train("--masked-loss", "true", data=_masked(w, None)), "01.png"),
    "mask of another size": (lambda w: w.train("--masked-loss", "true", data=_masked(w, Image.new("L", (64, 64), 255))),
                             "01.mask.png"),
    "all-zero mask": (lambda w: w.train("--masked-loss", "true", data=_masked(w, Image.new("L", (128, 128)))),
                      "all zero"),
    "background weight above one": (lambda w: w.train("--unmasked-weight", "2"), "unmasked-weight"),
    "prior prompt naming the token": (lambda w: w.train("--prior-prompt", "a <zorb>"), "prior_prompt"),
    "holding out every image": (lambda w: w.train("--holdout", "6"), "holdout"),
    "bucket that is no size": (lambda w: w.train("--buckets", "wide"), "--buckets"),
    "bucket the model cannot halve": (lambda w: w.train("--buckets", "18x16"), "18x16"),
    # --- base models
    "model folder missing": (lambda w: w.train(model=w.root / "no-model"), "no-model"),
    "model folder without an index": (lambda w: w.train(model=_model_with(w, lambda f: (f / "model_index.json").unlink())),
                                      "model_index.json"),
    "model index not JSON": (lambda w: w.train(model=_model_with(w, lambda f: (f / "model_index.json").write_text("{"))),
                             "model_index.json"),
    "model weights truncated": (lambda w: w.train(model=_model_with(
        w, lambda f: _truncated(f / "unet" / "diffusion_pytorch_model.safetensors"))), "unet"),
    "pickled checkpoint": (lambda w: w.train(model=w.file("model.ckpt", b"\x80\x04K\x01.")), "model.ckpt"),
    "single file of garbage": (lambda w: w.train(model=w.file("model.safetensors", os.urandom(4096))), "model.safetensors"),
    "single file holding a LoRA": (lambda w: w.train(model=w.prior / "adapter" / "pytorch_lora_weights.safetensors"),
                                   "pytorch_lora_weights.safetensors"),
    # --- run folders and resuming
    "train over a finished run": (lambda w: w.train(out="prior"), "prior"),
    "resume without checkpoints": (lambda w: w.train("--resume", "latest"), "checkpoint"),
    "resume from a folder that is no checkpoint": (lambda w: w.train("--resume", str(w.concept)), "checkpoint"),
    "resume with another rank": (lambda w: w.train("--resume", "latest", "--rank", "2", data=paths.DEMO_CONCEPT,
                                                             out="prior"), "rank"),
    "resume with another method": (lambda w: w.train("--resume", "latest", "--method", "lora",
                                                                 data=paths.DEMO_CONCEPT, out="prior"), "method"),
    "resume from truncated checkpoints": (lambda w: [_truncate_checkpoints(w.prior),
                                                     w.train("--resume", "latest", out="prior")][1], "checkpoint"),
    "resume with fewer steps than the checkpoint": (lambda w: w.train("--resume", "latest", "--steps", "1",
                                                                      data=paths.DEMO_CONCEPT, out="prior"),
                                                    "step 2"),
    # --- adapters: generate, export, merge, inspect
    "generate without a prompt": (lambda w: w.generate(), "prompt"),
    "generate with a missing adapter": (lambda w: w.generate("--prompt", "a", adapter=w.root / "gone"), "gone"),
    "generate with a weight that is no number": (lambda w: w.generate("--prompt", "a", adapter=f"{w.prior}:nan"),
                                                 "finite"),
    "generate with a pickled LoRA": (lambda w: w.generate("--prompt", "a", adapter=w.file("lora.pt", b"\x80\x04K\x01.")),
                                     "lora.pt"),
    "generate with a LoRA of another shape": (lambda w: w.generate("--prompt", "a", adapter=_kohya_with(
        w, lambda t: t.update({k: t[k][:, :-1] for k in [next(k for k in t if k.endswith("lora_down.weight"))]}))),
        "shape"),
    "generate at a size not a multiple of 8": (lambda w: w.generate("--prompt", "a", "--size", "20"), "size"),
    "export a truncated LoRA": (lambda w: w.export(_truncated(w.file("cut.safetensors", (
        w.prior / "kohya" / "run.safetensors").read_bytes()))), "cut.safetensors"),
    "export a LoRA missing its up factor": (lambda w: w.export(_kohya_with(
        w, lambda t: t.pop(next(k for k in t if k.endswith("lora_up.weight"))))), "no up factor"),
    "export a damaged checkpoint": (lambda w: w.export(_damaged(w.prior / "checkpoints")), "damaged"),
    "export a LoRA with a lone alpha": (lambda w: w.export(_kohya_with(w, lambda t: t.update(
        {"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": t[next(iter(t))]}))), "no down factor"),
    "export over an existing file": (lambda w: w.export(w.prior, out=w.file("taken.safetensors", b"mine")), "exist"),
    "export kohya to a folder name": (lambda w: w.export(w.prior, out="new"), "one .safetensors file"),
    "merge into a pickle suffix": (lambda w: ["merge", "--adapter", w.prior, "--base-model", w.model, "--out", "new.ckpt"],
                                   "new.ckpt"),
    "merge a LyCORIS file": (lambda w: ["merge", "--adapter", _kohya_with(w, lambda t: t.update(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": t[next(iter(t))]})), "--base-model", w.model,
        "--out", "new"], "LoHa"),
    "inspect a folder holding no adapter": (lambda w: ["inspect", w.concept], "not a run folder"),
    "inspect random bytes": (lambda w: ["inspect", w.file("noise.safetensors", os.urandom(2048))], "noise.safetensors"),
    "generate with a NaN in a LoRA": (lambda w: w.generate("--prompt", "a", adapter=_kohya_factor(
        w, "lora_down.weight", float("nan"))), "k_proj.lora_down.weight"),
    "generate with an Inf in a LoRA": (lambda w: w.generate("--prompt", "a", adapter=_kohya_factor(
        w, "lora_up.weight", float("inf"))), "k_proj.lora_up.weight"),
    "merge a LoRA holding a NaN": (lambda w: _merge(w, _kohya_factor(w, "lora_up.weight", float("nan"))),
                                   "k_proj.lora_up.weight"),
    "merge a LoRA with an infinite alpha": (lambda w: _merge(w, _kohya_factor(w, "alpha", float("inf"))), "alpha"),
    "inspect a LoRA holding a NaN": (lambda w: ["inspect", _kohya_factor(w, "lora_down.weight", float("nan"))],
                                     "k_proj.lora_down.weight"),
    "inspect a LoRA holding an Inf": (lambda w: ["inspect", _kohya_factor(w, "lora_up.weight", float("-inf"))],
                                      "k_proj.lora_up.weight"),
    "inspect a NaN token embedding": (lambda w: ["inspect", _nan_embedding(w)], "<zorb>"),
    "inspect a checkpoint holding a NaN": (lambda w: ["inspect", _poisoned_checkpoint(w.prior)], "lora_A"),
    "inspect a LoRA of rank zero": (lambda w: ["inspect", _kohya_with(w, lambda t: t.update(
        {k: t[k][:0] if k.endswith("down.weight") else t[k][:, :0] for k in t if "layers_0_self_attn_k_proj.lora" in k}))],
        "k_proj"),
    "inspect a scalar factor without alpha": (lambda w: ["inspect", _kohya_with(w, lambda t: t.update(
        {k: t[k].sum() for k in t if k.endswith("down.weight")}) or _drop_alphas(t))], "lora_down.weight"),
    "inspect a vector alpha": (lambda w: ["inspect", _kohya_factor(w, "alpha", lambda t: t.reshape(1).repeat(2))],
                               "alpha"),
    "inspect a true-or-false alpha": (lambda w: ["inspect", _kohya_factor(w, "alpha", lambda t: t > 0)], "alpha"),
    "inspect integer factors": (lambda w: ["inspect", _kohya_factor(w, "lora_down.weight", lambda t: t.int())],
                                "k_proj.lora_down.weight"),
    "inspect a rank above the layer": (lambda w: ["inspect", _kohya_with(w, lambda t: t.update(
        {k: t[k].repeat(16, 1) if k.endswith("down.weight") else t[k].repeat(1, 16)
         for k in t if "layers_0_self_attn_k_proj.lora" in k}))], "k_proj"),
    "inspect a diffusers alpha that is a word": (lambda w: ["inspect", _diffusers_metadata(
        w, '{"unet.lora_alpha": "big"}')], "alpha"),
    "inspect diffusers metadata that is no mapping": (lambda w: ["inspect", _diffusers_metadata(w, "[1]")],
                                                      "lora_adapter_metadata"),
    "inspect a kohya token list of numbers": (lambda w: ["inspect", _kohya_metadata(w, {"balora.token": "[1]"})],
                                              "balora.token"),
    "merge over an embedding beside the output": (lambda w: [w.file("zorb.safetensors", b"mine"), _merge(
        w, w.prior, out="new.safetensors")][1], "--overwrite true"),
    "merge under a file": (lambda w: _merge(w, w.prior, out=w.file("notes.txt", "hi") / "new.safetensors"), "is a file"),
    "merge into /proc": (lambda w: _merge(w, w.prior, out="/proc/new"), "cannot write"),
    "export under a file": (lambda w: w.export(w.prior, out=w.file("notes.txt", "hi") / "new.safetensors"), "is a file"),
    "export into /proc": (lambda w: w.export(w.prior, out="/proc/new.safetensors"), "cannot write"),
    # --- sweeps and benchmarks
    "sweep with an unknown method": (lambda w: ["sweep", "--methods", "lora", "bolora", "--out", "out"], "bolora"),
    "sweep with a learning rate that is no number": (lambda w: ["sweep", "--lrs", "fast", "--out", "out"], "fast"),
    "sweep setting an unknown option": (lambda w: ["sweep", "--set", "stepz=3", "--out", "out"], "stepz"),
    "sweep setting the method": (lambda w: ["sweep", "--set", "method=lora", "--out", "out"], "--methods"),
    "sweep with a bad value in the grid": (lambda w: ["sweep", "--set", "steps=3,0", "--out", "out"], "steps"),
    "sweep with zero workers": (lambda w: ["sweep", "--workers", "0", "--out", "out"], "workers"),
    "sweep with an unknown launcher": (lambda w: ["sweep", "--launcher", "pbs", "--out", "out"], "launcher"),
    "sweep file missing": (lambda w: ["sweep", "--sweep", "nope.toml"], "nope.toml"),
    "sweep file with a training option": (lambda w: ["sweep", "--sweep", w.file("s.toml", "steps = 3\n")], "steps"),
    "sweep over a missing concept": (lambda w: ["sweep", "--set", f"data_dir={w.root / 'nowhere'}", "--out", "out"],
                                     "nowhere"),
    "sweep without a concept": (lambda w: ["sweep", "--out", "out"], "data_dir"),
    "concept benchmark with no time": (lambda w: ["bench", "concept", "--quick", "--max-minutes", "0", "--out", "out"],
                                       "max-minutes"),
    "sweep into a finished run": (lambda w: _tiny_sweep(w, w.prior), "prior"),
    "sweep into a file": (lambda w: _tiny_sweep(w, w.file("notes.txt", "hi")), "notes.txt"),
    "sweep into a folder that refuses writes": (lambda w: _tiny_sweep(w, "/proc/sweep"), "/proc"),
    **{f"{bench} benchmark into a file": (lambda w, bench=bench: ["bench", bench, "--quick", "--out",
                                                                  w.file("taken", "mine")], "taken")
       for bench in ("synthetic", "overhead", "loop", "base-model", "concept")},
    "synthetic benchmark over its earlier output": (lambda w: ["bench", "synthetic", "--quick", "--out", w.file(
        "bench/synthetic.json", "{}").parent], "synthetic.json"),
    "results page into a file": (lambda w: ["results", "--quick", "--out", w.file("taken", "mine"),
                                            "--concept", "concept-bench", "--synthetic", "synthetic-bench"], "taken"),
    # --- demo
    "demo with zero steps": (lambda w: ["demo", "--steps", "0", "--output-dir", "out"], "steps"),
    "demo with an unknown method": (lambda w: ["demo", "--method", "bolora", "--output-dir", "out"], "bolora"),
    "demo with a missing config": (lambda w: ["demo", "--config", "nope.toml", "--output-dir", "out"], "nope.toml"),
}


def _tiny_sweep(w: Work, out) -> list[str]:
    """A one-cell sweep of the quick training options into `out`."""
    options = ["data_dir=" + str(w.concept), "base_model=" + str(w.model), "token=<zorb>", "init_word=heart",
               "steps=1", "eval_every=1", "checkpoint_every=1", "sample_steps=1", "grid_seeds=1", "fusion=1",
               "heldout_size=2", "batch_size=2"]
    return ["sweep", "--methods", "lora", "--score", "false", "--set", *options, "--out", str(out)]


def _kohya_with(w: Work, change) -> Path:
    """A copy of the finished run's kohya file with `change(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(w.prior / "kohya" / "run.safetensors")
    change(tensors)
    path = w.root / "changed.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def _kohya_factor(w: Work, slot: str, value) -> Path:
    """The kohya file with the text encoder's first layer's `slot` (lora_down.weight, lora_up.weight, alpha)
    changed: a float goes into its first element, a function maps the tensor."""
    key = f"lora_te_text_model_encoder_layers_0_self_attn_k_proj.{slot}"

    def change(tensors):
        if callable(value):
            tensors[key] = value(tensors[key])
        else:
            tensors[key].view(-1)[0] = value
    return _kohya_with(w, change)


def _drop_alphas(tensors: dict) -> None:
    for key in [k for k in tensors if k.endswith(".alpha")]:
        del tensors[key]


def _nan_embedding(w: Work) -> Path:
    import torch
    from safetensors.torch import save_file

    path = w.root / "zorb.safetensors"
    save_file({"<zorb>": torch.full((1, 32), float("nan"))}, str(path))
    return path


def _merge(w: Work, adapter, out="new") -> list:
    return ["merge", "--adapter", adapter, "--base-model", w.model, "--out", out]


def _metadata_copy(w: Work, source: Path, metadata: dict) -> Path:
    from safetensors.torch import load_file, save_file

    path = w.root / "changed.safetensors"
    save_file(load_file(source), str(path), metadata=metadata)
    return path


def _diffusers_metadata(w: Work, config: str) -> Path:
    return _metadata_copy(w, w.prior / "adapter" / "pytorch_lora_weights.safetensors", {"lora_adapter_metadata": config})


def _kohya_metadata(w: Work, metadata: dict) -> Path:
    return _metadata_copy(w, w.prior / "kohya" / "run.safetensors", metadata)


def _poisoned_checkpoint(run: Path) -> Path:
    """A copy of the run's newest checkpoint with a NaN in one LoRA factor, its manifest made to match."""
    from safetensors.torch import load_file, save_file

    newest = sorted((run / "checkpoints").iterdir())[-1]
    copy = run.parent / "poisoned" / newest.name
    shutil.copytree(newest, copy)
    tensors = load_file(copy / "trainable.safetensors")
    tree = json.loads((copy / "trainable.json").read_text())
    first = next(ref["__tensor__"] for key, ref in tree["__dict__"] if "lora_A" in key)
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(copy / "trainable.safetensors"))
    (copy / "manifest.json").write_text(json.dumps({f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(
        f.read_bytes()).hexdigest()} for f in sorted(copy.iterdir()) if f.name != "manifest.json"}))
    return copy


def _damaged(checkpoints: Path) -> Path:
    newest = sorted(checkpoints.iterdir())[-1]
    data = bytearray((newest / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "trainable.safetensors").write_bytes(bytes(data))
    return newest


def _truncate_checkpoints(run: Path) -> None:
    for tensors in (run / "checkpoints").glob("*/*.safetensors"):
        _truncated(tensors)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(random_sd_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    args = ["train", "--data-dir", str(paths.DEMO_CONCEPT), "--base-model", str(random_sd_dir),
            "--output-dir", str(root / "run"), *TRAIN]
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *args], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((root / "run" / "run.json").read_text())["steps"] == 2
    return root / "run"


def test_the_campaign_covers_every_class_of_input():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, random_sd_dir, finished_run, tmp_path):
    work = Work(tmp_path, random_sd_dir, finished_run)
    make_args, fragment = CASES[name]
    args = make_args(work)
    before = _digest(work.prior)
    result = subprocess.run([sys.executable, "-m", "balora_diffusion.cli", *map(str, args)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"exit {result.returncode}; stderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("balora: error: "), lines
    assert fragment in lines[0], lines[0]
    written = [p for p in tmp_path.rglob("*") if (p.name in ("run.json", "pytorch_lora_weights.safetensors")
               or p.name.startswith("new")) and not p.is_relative_to(work.prior)]
    assert written == []
    if name not in ("resume from truncated checkpoints", "export a damaged checkpoint"):  # they damage it on purpose
        assert _digest(work.prior) == before
