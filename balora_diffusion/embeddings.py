"""New placeholder tokens with trainable embeddings, beside a frozen embedding table.

Only the k new rows are parameters. Making the whole 49,408-row table trainable and masking its
gradient (the textual-inversion script's way) would keep AdamW state for every row, and weight
decay would move rows that must stay frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from balora_diffusion.errors import UserError


class ExtendedEmbedding(nn.Module):
    """Frozen `base` table for ids < len(base), trainable `extra` rows for the ids after it."""

    def __init__(self, base: nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.extra = nn.Parameter(extra.detach().clone().float())

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        # Read by code that inspects the table (resize_token_embeddings, diffusers' textual inversion).
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)], dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.num_base
        out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        if not bool(is_new.any()):
            return out
        new = self.extra[(ids - self.num_base).clamp(min=0)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


def add_placeholder_tokens(tokenizer, text_encoder, tokens: list[str], init_word: str) -> ExtendedEmbedding:
    """Add `tokens` to the tokenizer and give each an embedding initialised from `init_word`.

    The text encoder's input embedding is replaced by an ExtendedEmbedding whose `extra` rows are
    the only trainable part; returns it.
    """
    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise UserError(f"placeholder token(s) {', '.join(existing)} already exist in the tokenizer: pick new ones")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise UserError(f"init word {init_word!r} tokenizes to nothing")
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise UserError(f"could not add tokens {tokens} to the tokenizer")
    base = text_encoder.get_input_embeddings()
    if isinstance(base, ExtendedEmbedding):
        raise UserError("the text encoder already has placeholder tokens")
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    if new_ids != list(range(base.num_embeddings, base.num_embeddings + len(tokens))):
        raise UserError("tokenizer and text encoder vocabularies are out of step: "
                        f"new ids {new_ids}, table has {base.num_embeddings} rows")
    with torch.no_grad():
        init = base.weight[init_ids].float().mean(0)
    extended = ExtendedEmbedding(base, init.expand(len(tokens), -1)).to(base.weight.device)
    text_encoder.set_input_embeddings(extended)
    return extended
