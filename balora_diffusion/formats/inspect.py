"""What an adapter holds, for a person (a table) or a program (a dict)."""
from __future__ import annotations

import re
from collections import Counter

from balora_diffusion.formats.adapter import Adapter
from balora_diffusion.formats.names import adapter_family
from balora_diffusion.lora import balance_diagnostics
from balora_diffusion.rules.pairs import LoRAPair


def _layer_kind(path: str) -> str:
    """A module path without its place in the model: `attn1.to_q`, `ff.net.0.proj`, `self_attn.q_proj`."""
    return re.sub(r"^.*\b(?:transformer_blocks|attentions|resnets|layers|samplers)\.\d+\.", "", path)


def _spread(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}..{high:g}"


def summary(adapter: Adapter) -> dict:
    """Format, architecture, kind, targets, ranks, alphas, tokens, training facts and per-pair balance."""
    pairs = [LoRAPair(m.down.float(), m.up.float(), name=f"{part}.{path}", conv=m.down.dim() == 4)
             for part, path, m in adapter.modules()]
    balance = balance_diagnostics(pairs)
    parts = {}
    for part, modules in adapter.parts().items():
        if modules:
            parts[part] = {
                "modules": len(modules),
                "targets": dict(sorted(Counter(_layer_kind(path) for path in modules).items())),
                "rank": _spread([m.rank for m in modules.values()]),
                "alpha": _spread([m.alpha for m in modules.values()]),
            }
    return {
        "source": adapter.source, "format": adapter.format, "architecture": adapter_family(adapter).title,
        "kind": adapter.kind,
        "parts": parts, "tokens": adapter.tokens,
        "embedding_norms": [] if adapter.embedding is None else adapter.embedding.norm(dim=1).tolist(),
        "training": adapter.info,
        "balance": {name: {key: value for key, value in d.items() if key != "rho"} for name, d in balance.items()},
    }


def render(report: dict) -> str:
    """The summary as text: a header, then one line per pair."""
    lines = [f"{report['source']}", f"  format        {report['format']}", f"  architecture  {report['architecture']}",
             f"  kind          {report['kind']}"]
    for part, facts in report["parts"].items():
        targets = ", ".join(f"{name} x{count}" for name, count in facts["targets"].items())
        lines.append(f"  {part:<13} {facts['modules']} modules, rank {facts['rank']}, alpha {facts['alpha']}: {targets}")
    if report["tokens"]:
        norms = ", ".join(f"{n:.3g}" for n in report["embedding_norms"])
        lines.append(f"  tokens        {' '.join(report['tokens'])} (embedding norm {norms})")
    for key, value in sorted(report["training"].items()):
        lines.append(f"  {key:<15} {value}")
    if report["balance"]:
        width = max(len(name) for name in report["balance"])
        lines.append("")
        lines.append(f"  {'pair':<{width}}  {'imbalance':>10}  {'|AA^T|/|B^TB|':>13}  {'cond A':>10}  {'cond B':>10}")
        for name, d in report["balance"].items():
            lines.append(f"  {name:<{width}}  {d['imbalance']:>10.3g}  {d['ratio']:>13.3g}  {d['cond_A']:>10.3g}  "
                         f"{d['cond_B']:>10.3g}")
    return "\n".join(lines)
