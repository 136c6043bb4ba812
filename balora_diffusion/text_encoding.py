"""The text encoders' conditioning for a training batch, each distinct caption encoded once.

A batch of one concept's images often repeats a caption ("a <zorb>" for every image without a
caption file). Without dropout the encoder maps equal token rows to equal hidden states, so
encoding the distinct rows and gathering them gives the same conditioning, and the gather's
backward sums the copies' gradients, which is the gradient of encoding every copy.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token rows of `captions`, padded or cut to the tokenizer's window (what the pipelines encode)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def has_active_dropout(text_encoder: torch.nn.Module) -> bool:
    """Whether a forward pass in the encoder's current mode draws dropout masks (then equal captions
    get different hidden states and must each be encoded)."""
    if not text_encoder.training:
        return False
    config = getattr(getattr(text_encoder, "module", text_encoder), "config", None)  # DDP wraps the model
    if any(getattr(config, name, 0.0) for name in ("dropout", "attention_dropout")):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in text_encoder.modules())


def _last_hidden_state(text_encoder: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (text_encoder(rows)[0],)


def encoded_rows(text_encoder: torch.nn.Module, ids: torch.Tensor, device: torch.device,
                 read: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, ...]],
                 distinct: bool = True) -> tuple[torch.Tensor, ...]:
    """`read(text_encoder, rows)`'s tensors (each one row per caption first) for the token rows `ids`
    (on the CPU, where the distinct rows are found without a device synchronisation); `distinct=False`
    encodes every row as given."""
    if not distinct or has_active_dropout(text_encoder):
        return read(text_encoder, ids.to(device))
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    if len(unique) == len(ids):
        return read(text_encoder, ids.to(device))
    inverse = inverse.to(device)
    return tuple(t.index_select(0, inverse) for t in read(text_encoder, unique.to(device)))


def encode_captions(text_encoder: torch.nn.Module, ids: torch.Tensor, device: torch.device,
                    distinct: bool = True) -> torch.Tensor:
    """Last hidden states [batch, tokens, width] for the token rows `ids`."""
    return encoded_rows(text_encoder, ids, device, _last_hidden_state, distinct)[0]
