"""LoRA in a model: find peft's (A, B) pairs and measure their balance."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from peft.tuners.lora import LoraLayer

from balora_diffusion.rules.pairs import LoRAPair


def find_lora_pairs(module: torch.nn.Module) -> list[LoRAPair]:
    """Every trainable peft LoRA pair in `module`, named "<module path>.<adapter name>".

    Linear and Conv layers (conv=True) use lora_A / lora_B; Embedding layers use
    lora_embedding_A (r x num_embeddings) / lora_embedding_B (dim x r), whose update is
    the same product B @ A, transposed.
    """
    pairs = []
    for path, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter, down in layer.lora_A.items():
            A, B = down.weight, layer.lora_B[adapter].weight
            if A.requires_grad or B.requires_grad:
                pairs.append(LoRAPair(A, B, name=f"{path}.{adapter}", conv=A.dim() > 2))
        for adapter, A in layer.lora_embedding_A.items():
            B = layer.lora_embedding_B[adapter]
            if A.requires_grad or B.requires_grad:
                pairs.append(LoRAPair(A, B, name=f"{path}.{adapter}"))
    return pairs


def _condition_number(M: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(M)
    return torch.where(s[..., -1] > 0, s[..., 0] / s[..., -1], torch.inf)


@torch.no_grad()
def balance_diagnostics(pairs: Iterable[LoRAPair]) -> dict[str, dict[str, float | list]]:
    """Per pair name: how far from balanced the pair is, in float64.

    imbalance: ||A A^T - B^T B||_F / ||A A^T||_F (0 when balanced; inf when only A = 0)
    ratio:     ||A A^T||_F / ||B^T B||_F (1 when balanced; inf at peft's init B = 0;
               nan for A = B = 0)
    rho:       r / m, the ratio iLoRA's target A A^T = rho B^T B implies
    cond_A, cond_B: largest / smallest singular value (inf when rank-deficient)
    Values are floats, or nested lists for pairs with leading batch dims.
    """
    report = {}
    for number, pair in enumerate(pairs):
        A = pair.a_matrix(pair.A.detach()).double()
        B = pair.b_matrix(pair.B.detach()).double()
        AA, BB = A @ A.mT, B.mT @ B
        norm_AA, norm_BB = torch.linalg.matrix_norm(AA), torch.linalg.matrix_norm(BB)
        report[pair.name or f"pair{number}"] = {
            "imbalance": (torch.linalg.matrix_norm(AA - BB) / norm_AA).tolist(),
            "ratio": (norm_AA / norm_BB).tolist(),
            "rho": A.shape[-2] / B.shape[-2],
            "cond_A": _condition_number(A).tolist(),
            "cond_B": _condition_number(B).tolist(),
        }
    return report


def inject_lora(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module], cfg) -> None:
    """Add a trainable adapter ("default") of kind `cfg.adapter_kind` with peft to the UNet and to each of `text_encoders`
    (name -> model: those that train LoRA); `cfg` carries rank / alpha / targets per part (see TrainConfig).

    Parameters that were trainable before (the new token rows) stay trainable.
    peft's init (A kaiming-uniform, B = 0) keeps the model unchanged at step 0. A rank above a
    targeted layer's smaller dimension cannot add anything and is refused.
    """
    from peft import LoraConfig

    from balora_diffusion.adapters import get_kind
    from balora_diffusion.errors import UserError

    options = get_kind(cfg.adapter_kind).peft_options
    parts = [(unet, cfg.rank, cfg.alpha, cfg.unet_targets, "UNet")]
    parts += [(model, cfg.text_rank, cfg.text_alpha, cfg.text_targets, name.replace("_", " "))
              for name, model in text_encoders.items()]
    for model, rank, alpha, targets, what in parts:
        if rank < 1:
            raise UserError(f"{what} LoRA rank must be >= 1, got {rank}")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True, **options)
        # add_adapter freezes every parameter outside the adapter, the new token rows included.
        trainable = [p for p in model.parameters() if p.requires_grad]
        try:
            model.add_adapter(config)
        except ValueError as exc:
            raise UserError(f"{what} LoRA targets {list(targets)}: {str(exc).splitlines()[0]}") from None
        for p in trainable:
            p.requires_grad_(True)
        too_small = [p.name for p in find_lora_pairs(model)
                     if rank > min(p.a_matrix(p.A).shape[-1], p.b_matrix(p.B).shape[-2])]
        if too_small:
            raise UserError(f"{what} LoRA rank {rank} is larger than layer {too_small[0]} allows "
                            f"({len(too_small)} layer(s) too small): lower --{'text-' if what != 'UNet' else ''}rank")
