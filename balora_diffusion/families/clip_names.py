"""Layer names of CLIP text encoders, which every family's text encoders are, in any spelling."""
from __future__ import annotations

import re

TEXT_LAYER = re.compile(r"(?:text_model[._])?encoder[._]layers[._](\d+)[._](self_attn[._](?:q|k|v|out)_proj|mlp[._]fc[12])")


def text_encoder_path(name: str) -> str | None:
    """`encoder.layers.I.<layer>` for a text-encoder layer name in any spelling (dots or underscores,
    with or without `text_model`), or None."""
    found = TEXT_LAYER.fullmatch(name)
    if found is None:
        return None
    layer = found.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"encoder.layers.{found.group(1)}.{layer}"


def canonical_text_path(name: str) -> str:
    """A text-encoder module name in the canonical spelling: without transformers 4's `text_model.`."""
    return text_encoder_path(name) or name.removeprefix("text_model.")
