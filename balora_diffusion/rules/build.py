"""build_optimizer: a method name, param groups and LoRA pairs in, a RuleOptimizer out."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from balora_diffusion.rules.optimizer import RuleConfigError, RuleOptimizer
from balora_diffusion.rules.pairs import LoRAPair
from balora_diffusion.rules.registry import parse_method

BaseFactory = Callable[..., torch.optim.Optimizer]


def _adamw8bit(groups: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise RuleConfigError("base optimizer 'adamw8bit' needs bitsandbytes, which is not installed "
                              "(pip install bitsandbytes)") from exc
    return bitsandbytes.optim.AdamW8bit(groups, **kwargs)


BASES: dict[str, BaseFactory] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adamw8bit": _adamw8bit,
}


def _copy_groups(groups: Iterable) -> list[dict]:
    """Torch-style param groups as fresh dicts (the caller's are not modified)."""
    groups = list(groups)
    if not groups:
        raise RuleConfigError("the optimizer got no parameters")
    if not isinstance(groups[0], dict):
        return [{"params": groups}]
    return [{**group, "params": list(group["params"])} for group in groups]


def split_loraplus(groups: list[dict], pairs: list[LoRAPair], ratio: float,
                   default_lr: float | None) -> list[dict]:
    """Each group's B factors moved to a sibling group with lr x ratio; everything else kept as it was."""
    b_ids = {id(pair.B) for pair in pairs}
    out = []
    for number, group in enumerate(groups):
        bs = [p for p in group["params"] if id(p) in b_ids]
        rest = [p for p in group["params"] if id(p) not in b_ids]
        if not bs:
            out.append(group)
            continue
        lr = group.get("lr", default_lr)
        if lr is None:
            raise RuleConfigError(f"loraplus needs a learning rate: give param group "
                                  f"{group.get('name', number)!r} an 'lr' or pass base_kwargs={{'lr': ...}}")
        if rest:
            out.append({**group, "params": rest})
        b_group = {**group, "params": bs, "lr": lr * ratio}
        if "name" in group:
            b_group["name"] = f"{group['name']}.lora_B"
        out.append(b_group)
    return out


def make_base(base: str | BaseFactory, groups: list[dict], base_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    if callable(base):
        factory = base
    else:
        factory = BASES.get(str(base).lower())
        if factory is None:
            raise RuleConfigError(f"unknown base optimizer {base!r}; expected one of {', '.join(BASES)} or a callable")
    optimizer = factory(groups, **base_kwargs)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RuleConfigError(f"base optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
    return optimizer


def build_optimizer(method: str, groups: Iterable, pairs: Iterable[LoRAPair], *,
                    base: str | BaseFactory = "adamw", base_kwargs: dict[str, Any] | None = None,
                    loraplus_ratio: float = 16.0, reg: float = 1e-6, lam: float = 1.0, rho: float | None = None,
                    project_every: int = 1, align: bool = True, tol: float = 1e-6,
                    state: str = "keep") -> RuleOptimizer:
    """The optimizer for `method` (see METHODS) over `groups`, with the rules acting on `pairs`.

    Parameters of `groups` that belong to no pair (token embeddings, ...) get the base
    optimizer's step only; pairs outside `groups` are ignored.
    """
    spec = parse_method(method)
    groups, pairs = _copy_groups(groups), list(pairs)
    base_kwargs = dict(base_kwargs or {})
    if spec.loraplus:
        groups = split_loraplus(groups, pairs, loraplus_ratio, base_kwargs.get("lr"))
    optimizer = make_base(base, groups, base_kwargs)
    return RuleOptimizer(optimizer, pairs, precondition=spec.scaled, after=spec.after, reg=reg, lam=lam, rho=rho,
                         project_every=project_every, align=align, tol=tol, state=state)
