"""What gradient fusion costs on Stable Diffusion 1.5, computed from its layer shapes.

Per adapted layer of input width d (fusion.py, gradient_fusion.py): one float64 Gram G (d x d) per
layer summed over the concepts, and while a concept is recorded its own Grams beside it; the solve
is one symmetric eigendecomposition of G, the pseudo-inverse assembled from it, and the stacked
down rows A_i G_i (n concepts of rank r: n r rows) multiplied by it. Recording adds X^T X for the
N columns a layer reads per call. Flop counts are the textbook ones: about 9 d^3 for a symmetric
eigendecomposition with its vectors (Golub & Van Loan, 4th ed., table 8.3.1), 2 m k n for an
(m x k) (k x n) product.
"""
from __future__ import annotations

from dataclasses import dataclass

BYTES = 8          # float64
EIGH_FLOPS = 9     # x d^3
# SD 1.5 at 512 px: the latent is 64 x 64, halved after each of down_blocks.0-2 (down_blocks.i at
# 64 / 2^i), mid_block at 8 x 8, and up_blocks.j back at 64 / 2^(3-j).
LATENT_SIDE = 64
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Layer:
    name: str
    outputs: int
    inputs: int      # d: the Gram is d x d
    columns: int     # the columns X it reads per call (positions, or text tokens)


def columns_per_call(name: str) -> int:
    """Positions an SD 1.5 attention projection reads per UNet (or text-encoder) call at 512 px."""
    if name.startswith("text_encoder.") or name.endswith(("attn2.to_k", "attn2.to_v")):
        return TEXT_TOKENS
    if name.startswith("mid_block."):
        level = 3
    else:
        block, index = name.split(".")[:2]
        level = int(index) if block == "down_blocks" else 3 - int(index)
    return (LATENT_SIDE >> level) ** 2


def sd15_layers() -> list[Layer]:
    """The 176 layers SD 1.5 LoRAs adapt by default: the UNet's 128 attention projections and the
    text encoder's 48, built on the meta device (no download)."""
    from balora_diffusion.bench.sd15_shapes import text_encoder_shapes, unet_shapes

    named = [(name, o, i) for name, o, i in unet_shapes()]
    named += [(f"text_encoder.{name}", o, i) for name, o, i in text_encoder_shapes()]
    return [Layer(name, o, i, columns_per_call(name)) for name, o, i in named]


def cost(layers: list[Layer], concepts: int, rank: int) -> dict[str, float]:
    """Memory (bytes) and flops of gradient-fusing `concepts` adapters of rank `rank` on `layers`.

    gram_bytes: the summed Grams; peak_gram_bytes: those and one concept's being recorded;
    solve_flops: eigendecompositions, pseudo-inverses, the down rows' products, all layers;
    record_flops_unet_call / record_flops_text_call: X^T X of every UNet layer for one UNet call on
    one image, of every text-encoder layer for one prompt's encoding."""
    grams = sum(layer.inputs ** 2 for layer in layers) * BYTES
    solve = 0
    for layer in layers:
        d, rows = layer.inputs, concepts * rank
        solve += EIGH_FLOPS * d ** 3          # G = V diag V^T
        solve += 2 * d ** 3                   # G^+ = V diag^+ V^T
        solve += concepts * 2 * rank * d * d  # A_i G_i
        solve += 2 * rows * d * d             # [A_i G_i] G^+
    record = {part: sum(2 * layer.columns * layer.inputs ** 2 for layer in layers
                        if layer.name.startswith("text_encoder.") == (part == "text"))
              for part in ("unet", "text")}
    return {"layers": len(layers), "gram_bytes": grams, "peak_gram_bytes": 2 * grams, "solve_flops": solve,
            "record_flops_unet_call": record["unet"], "record_flops_text_call": record["text"]}
