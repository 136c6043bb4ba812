"""Several concept adapters made into one: by summing their updates, or by gradient fusion (each
layer's update that best reproduces every concept's own outputs on the inputs that concept's own
model feeds it while drawing its prompts; the math is gradient_fusion.py).

Both results are LoRA products again: the sum is exact at rank sum_i r_i, gradient fusion's closed
form too; either is cut to a chosen rank by SVD, with the relative error that leaves recorded.
Every concept keeps its token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from balora_diffusion.errors import UserError
from balora_diffusion.formats.adapter import Adapter, LoraModule
from balora_diffusion.formats.fuse import Fused, fit
from balora_diffusion.gradient_fusion import DTYPE, LayerTerms, lossless_rank, solve_layers, truncate
from balora_diffusion.gram_recorder import GramRecorder

METHODS = ("gradient", "sum")


@dataclass
class Concept:
    """One adapter to fuse, at its weight, with the prompts its concept is drawn with."""

    label: str
    adapter: Adapter
    weight: float
    prompts: list[str]


def _layer_key(part: str, path: str) -> str:
    return f"{part}:{path}"


def _factors(module: LoraModule, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, A) in float64 with U @ A the update at `weight`, a convolution's flattened to matrices."""
    return weight * module.scale * module.up.to(DTYPE).flatten(1), module.down.to(DTYPE).flatten(1)


def check_concepts(concepts: list[Concept], max_rank: int, rank: int | None) -> None:
    """UserError unless the adapters can be fused into one: two or more, one base model, every shared
    layer of one shape, no token twice, and a fused rank within `max_rank` unless `rank` cuts it."""
    if len(concepts) < 2:
        raise UserError(f"fusing needs two or more adapters, got {len(concepts)}")
    hashes = {c.label: c.adapter.info["base_model_hash"] for c in concepts if "base_model_hash" in c.adapter.info}
    if len(set(hashes.values())) > 1:
        raise UserError("the adapters were trained on different base models: "
                        + ", ".join(f"{label} on {str(h)[:12]}" for label, h in hashes.items()))
    tokens: dict[str, str] = {}
    for concept in concepts:
        for token in concept.adapter.tokens:
            if token in tokens:
                raise UserError(f"{tokens[token]} and {concept.label} both define the token {token}; a fused "
                                "adapter needs one token per concept")
            tokens[token] = concept.label
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    ranks: dict[str, int] = {}
    for concept in concepts:
        for part, path, module in concept.adapter.modules():
            key, shape = _layer_key(part, path), (module.weight_shape[0], module.down[0].numel())
            seen = shapes.setdefault(key, (shape, concept.label))
            if seen[0] != shape:
                raise UserError(f"{seen[1]} and {concept.label} adapt {key} with weights of shapes {list(seen[0])} "
                                f"and {list(shape)}: adapters of different base models")
            ranks[key] = ranks.get(key, 0) + module.rank
    if rank is None:
        for key, total in ranks.items():
            exact = min(total, *shapes[key][0])
            if exact > max_rank:
                raise UserError(f"the fused adapter would have rank {exact} at {key} (the adapters' ranks there add "
                                f"up), above the limit of {max_rank}: give --rank R to cut it, or raise --max-rank")


def _layers(pipe, concepts: list[Concept]) -> dict[str, torch.nn.Module]:
    layers = {}
    for concept in concepts:
        for (part, path, _), (layer, _) in zip(concept.adapter.modules(), fit(pipe, concept.adapter)):
            layers[_layer_key(part, path)] = layer
    return layers


def _updates(concept: Concept) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {_layer_key(part, path): _factors(module, concept.weight) for part, path, module in concept.adapter.modules()}


def summed(concepts: list[Concept]) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """Every layer's sum_i w_i dW_i as concatenated factors."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for concept in concepts:
        for key, factors in _updates(concept).items():
            parts.setdefault(key, []).append(factors)
    return {key: (torch.cat([u for u, _ in f], dim=1), torch.cat([a for _, a in f]), {}) for key, f in parts.items()}


def gradient_fused(pipe, concepts: list[Concept], *, ridge: float, steps: int, seeds: list[int], guidance: float,
                   progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """Every layer's gradient-fused update as factors, with its Gram's condition number: each concept's
    layer inputs are recorded while the base model with that concept's adapter (and token) samples the
    concept's prompts for `steps` steps, the text encoder's included."""
    from balora_diffusion.generate import generate

    layers = _layers(pipe, concepts)
    terms = {key: LayerTerms([], [], torch.zeros(())) for key in layers}
    for concept in tqdm(concepts, desc="recording layer inputs", unit="concept", disable=not progress):
        with Fused(pipe, [(concept.adapter, concept.weight)]), GramRecorder(layers) as recorder:
            generate(pipe, concept.prompts, seeds, steps=steps, guidance_scale=guidance, progress=False)
        updates = _updates(concept)
        for key, layer_terms in terms.items():
            gram = recorder.gram_of(key)
            layer_terms.gram = layer_terms.gram + gram
            if key in updates:
                up, down = updates[key]
                layer_terms.ups.append(up)
                layer_terms.projected.append(down @ gram)
    return {key: (layer.up, layer.down, {"condition": layer.condition, "singular": layer.singular})
            for key, layer in solve_layers(terms, ridge).items()}


def fused_adapter(concepts: list[Concept], layers: dict[str, tuple[torch.Tensor, torch.Tensor, dict]],
                  shapes: dict[str, tuple[int, ...]], rank: int | None, info: dict) -> tuple[Adapter, list[dict]]:
    """The Adapter of fused factors (cut to `rank` where given, and to the layer's size where the
    factors are wider), each at alpha = rank, with every concept's tokens; and per layer a report."""
    adapter = Adapter(tokens=[t for c in concepts for t in c.adapter.tokens], info=info, format="balora fuse")
    embeddings = [c.adapter.embedding for c in concepts if c.adapter.embedding is not None]
    adapter.embedding = torch.cat(embeddings) if embeddings else None
    report, factors = [], {}
    for key, (up, down, facts) in layers.items():
        lost = 0.0
        if rank is not None or up.shape[1] > lossless_rank(up, down):
            up, down, lost = truncate(up, down, lossless_rank(up, down) if rank is None else rank)
        factors[key] = (up, down)
        report.append({"layer": key, "rank": up.shape[1], "truncation_loss": lost, **facts})
    for key, (up, down) in factors.items():
        part, path = key.split(":", 1)
        shape, width = shapes[key], up.shape[1]
        down_shaped = down.float().reshape(width, *shape[1:])
        up_shaped = up.float().reshape(shape[0], width, *([1] * (len(shape) - 2)))
        adapter.parts()[part][path] = LoraModule(down_shaped.contiguous(), up_shaped.contiguous(), float(width), key=key)
    return adapter, report


def fuse_concepts(pipe, concepts: list[Concept], method: str, *, rank: int | None, info: dict, ridge: float,
                  steps: int, seeds: list[int], guidance: float,
                  progress: bool = True) -> tuple[Adapter, list[dict]]:
    """The fused Adapter of `concepts` on `pipe` by `method` ("gradient" records each concept's layer
    inputs, "sum" needs none), with `info` and its rank, and the per-layer report."""
    shapes = layer_shapes(pipe, concepts)  # also refuses an adapter that does not fit the base model
    if method == "gradient":
        layers = gradient_fused(pipe, concepts, ridge=ridge, steps=steps, seeds=seeds, guidance=guidance,
                                progress=progress)
    else:
        layers = summed(concepts)
    adapter, report = fused_adapter(concepts, layers, shapes, rank, info)
    adapter.info["rank"] = max(entry["rank"] for entry in report)
    return adapter, report


def layer_shapes(pipe, concepts: list[Concept]) -> dict[str, tuple[int, ...]]:
    """The base model's weight shape of every adapted layer (a LoRA may give a 1x1 conv as a Linear)."""
    return {key: tuple(layer.weight.shape) for key, layer in _layers(pipe, concepts).items()}


def concept_prompts(path: Path, adapter: Adapter, lines: list[str] | None) -> list[str]:
    """The prompts a concept is drawn with for recording: the lines of a prompts file that name one of
    its tokens; else its run's concept.toml eval_prompts; else its run's captions."""
    from balora_diffusion.concept import load_concept
    from balora_diffusion.data import read_concept_folder

    tokens = adapter.tokens
    if not tokens:
        raise UserError(f"adapter {path} has no token of its own, so no prompt can draw its concept alone")
    if lines is not None:
        named = [line for line in lines if any(token in line for token in tokens)]
        if not named:
            raise UserError(f"no line of the prompts file names {' or '.join(tokens)} (adapter {path})")
        return named
    config = _run_config(path)
    data_dir = Path(str(config.get("data_dir") or ""))
    if not config or not data_dir.is_dir():
        raise UserError(f"adapter {path}: its concept's images are not at hand to take prompts from "
                        f"({'no run folder' if not config else f'no folder {data_dir}'}); give --prompts-file "
                        f"with lines naming {' '.join(tokens)}")
    if (data_dir / "concept.toml").is_file():
        return list(load_concept(data_dir).eval_prompts)
    template = str(config.get("caption_template") or "a {token}")
    return sorted({example.caption for example in read_concept_folder(data_dir, tokens, template)})


def _run_config(path: Path) -> dict:
    from balora_diffusion.run_layout import CONFIG, RUN
    from balora_diffusion.runs import own_file

    if not path.is_dir():
        return {}
    for name in (CONFIG, RUN):
        if (found := own_file(path, name)) is not None:
            try:
                data = json.loads(found.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            data = data.get("config", data) if name == RUN else data
            if isinstance(data, dict):
                return data
    return {}
